"""Importance order: permute each channel group so its prefixes hold its most important channels.

Slicing keeps prefixes. A network trained alone (or imported) has its
channels in an arbitrary order, so a slim prefix would be an arbitrary subset.
Permuting the channels of a group -- the output rows of every layer that writes
it, the per-channel parameters of every BatchNorm and depthwise convolution
that carries it, the input columns of every layer that reads it -- is an exact
symmetry of the network: the full-width function does not change (up to float
summation order), but narrow sub-networks now start from the best channels.

**Importance** [ours]: ``"l1"`` (default) scores channel ``c`` of a group by
the L1 norm of the weights that produce it, with the BatchNorm that follows
folded in, ``|gamma_c| / sqrt(var_c + eps) * ||W_c||_1`` (the L1 norm of the
effective conv+BN filter, as network-slimming and L1 filter pruning rank
channels), each producer's scores divided by their mean and summed over the
producers of the group (a residual stream is written by several layers).
Any other ranking, such as a learned noise ranking, plugs in as a callable
``importance(group, root) -> Tensor`` of ``group.size`` scores (higher = kept
in more sub-networks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from dsnet.layers.channel_groups import ChannelGroup, ChannelUse, analyse, trace
from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d
from dsnet.utils.modes import temporary_mode

__all__ = ["Importance", "l1_importance", "group_permutations", "permute_channels", "reorder_channels"]

Importance = str | Callable[[ChannelGroup, nn.Module], Tensor] | None


def _rows(use: ChannelUse, group: ChannelGroup, sizes: Mapping[int, int]) -> slice:
    """Where ``group``'s channels lie along ``use``'s dimension (a layer may write several groups side by side)."""
    offset = 0
    for g in use.spec:
        if g == group.id:
            return slice(offset, offset + group.size)
        offset += sizes[g]
    raise ValueError(f"{use.module} does not carry group {group.name!r}")


def l1_importance(group: ChannelGroup, root: nn.Module, sizes: Mapping[int, int] | None = None) -> Tensor:
    """L1 norm of each channel's (BN-folded) producing weights, mean-normalised per producer, summed.

    ``sizes`` (group id -> size) is needed only when a producer writes several groups side by side.
    """
    modules = dict(root.named_modules())
    total = torch.zeros(group.size, dtype=torch.float64)
    for use in group.uses:
        if use.role != "out":
            continue
        rows = _rows(use, group, sizes or {group.id: group.size})
        weight = modules[use.module].weight.detach().double()
        score = weight.abs().flatten(1).sum(1)[rows]
        if use.bn is not None:
            bn = modules[use.bn]
            var = bn.running_var.detach().double()
            if var.dim() == 2:  # dsnet BN: the statistics the full-width network uses
                var = var[use.bn_slot if use.bn_slot is not None else -1]
            score = score * (bn.weight.detach().double().abs() / torch.sqrt(var + bn.eps))[rows]
        mean = score.mean()
        if mean > 0:
            total += score / mean
    return total


def group_permutations(
    groups: Mapping[int, ChannelGroup], root: nn.Module, importance: Importance = "l1"
) -> dict[int, Tensor]:
    """For every group that slices, the channel order by decreasing importance (stable)."""
    if importance is None or importance == "none":
        return {}
    sizes = {gid: g.size for gid, g in groups.items()}
    if importance == "l1":

        def score_fn(group: ChannelGroup, root: nn.Module) -> Tensor:
            return l1_importance(group, root, sizes)

    elif callable(importance):
        score_fn = importance
    else:
        raise ValueError(f"importance must be 'l1', None or a callable (group, root) -> scores, got {importance!r}")
    perms = {}
    for gid, group in groups.items():
        if group.fixed is not None:
            continue
        scores = torch.as_tensor(score_fn(group, root)).detach().flatten().cpu()
        if scores.numel() != group.size:
            raise ValueError(f"importance of group {group.name!r}: {scores.numel()} scores for {group.size} channels")
        perms[gid] = torch.argsort(scores.double(), descending=True, stable=True)
    return perms


def _channel_index(spec: tuple[int, ...], sizes: Mapping[int, int], perms: Mapping[int, Tensor]) -> Tensor:
    """Index along a dimension laid out as ``spec``: each group's channels in their new order."""
    parts, offset = [], 0
    for g in spec:
        size = sizes[g]
        parts.append(offset + (perms[g] if g in perms else torch.arange(size)))
        offset += size
    return torch.cat(parts)


@torch.no_grad()
def _take(tensor: Tensor | None, dim: int, index: Tensor) -> None:
    if tensor is not None:
        tensor.copy_(tensor.index_select(dim, index.to(tensor.device)))


def permute_channels(
    root: nn.Module,
    uses: list[ChannelUse],
    sizes: Mapping[int, int],
    perms: Mapping[int, Tensor],
    layout: Callable[[tuple[int, ...]], Tensor | None] | None = None,
) -> None:
    """Apply group permutations (and, for composite layouts, the ``layout`` order) to every use, in place.

    ``layout(spec)`` may return an order of a composite dimension's channels
    (see :mod:`dsnet.convert.network`); it is applied after the permutations.
    Parameters keep their identity (optimisers and caches stay valid).
    """
    modules = dict(root.named_modules())
    for use in uses:
        order = layout(use.spec) if layout is not None else None
        if order is None and not any(g in perms for g in use.spec):
            continue
        index = _channel_index(use.spec, sizes, perms)
        if order is not None:
            index = index[order]
        if use.inner > 1:
            index = (index[:, None] * use.inner + torch.arange(use.inner)).flatten()
        m = modules[use.module]
        if use.role == "out":
            _take(m.weight, 0, index)
            _take(m.bias, 0, index)
        elif use.role == "in":
            _take(m.weight, 1, index)
        elif isinstance(m, nn.BatchNorm2d | SlicedBatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                _take(t, t.dim() - 1, index)
        elif isinstance(m, nn.Conv2d | SlicedConv2d):  # depthwise
            _take(m.weight, 0, index)
            _take(m.bias, 0, index)
        else:
            raise TypeError(f"cannot permute the channels of {use.module!r} ({type(m).__name__})")


class _FullWidth(nn.Module):
    """A dynamic model's largest sub-network as one ``forward`` torch.fx can trace (sliced layers as leaves).

    It also returns the gate's slimming-head logits, so the gate encoder's
    units are seen with every layer that reads them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = self.model.largest
        h, z = self.model.forward_pre(x, k)
        return self.model.forward_post(h, k), self.model.gate.raw_logits(z)


def reorder_channels(model: nn.Module, importance: Importance = "l1", input_size: int = 64) -> int:
    """Permute every channel group of a dsnet CNN by importance; returns how many groups were reordered.

    For weights imported from a network trained alone (torchvision, timm):
    the model is traced at its largest sub-network, where every layer is at
    full width, so the groups found are the groups the sub-networks slice.
    The full-width function is unchanged (up to float summation order).
    Groups the analysis cannot follow keep their order.
    """
    wrapper = _FullWidth(model)
    c = model.in_chans
    size = min(input_size, model.default_input_size[-1])
    ref = next(model.parameters())
    example = torch.zeros(2, c, size, size, device=ref.device, dtype=ref.dtype)
    with temporary_mode(model, False):
        gm, _ = trace(wrapper, example)
    cg = analyse(gm)
    perms = group_permutations(cg.groups, wrapper, importance)
    uses = list({(u.module, u.role): u for g in cg.groups.values() for u in g.uses}.values())
    sizes = {gid: g.size for gid, g in cg.groups.items()}
    permute_channels(wrapper, uses, sizes, perms)
    return len(perms)
