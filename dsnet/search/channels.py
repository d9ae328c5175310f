"""Channel maps: which weights and statistics are indexed by a stage's channels.

Progressive sub-network search ranks a stage's channel groups and then
*permutes* the stage's channels so the most important groups come first; after
that, keeping the ``k`` most important groups is an ordinary prefix slice, and
the searched sub-networks are served by the same sliced layers as every other
dsnet model. A permutation must reorder every tensor axis that the stage's
channels index -- the layers that produce them (output rows, BatchNorm affine
and running statistics of every slot) and the layers that consume them (input
columns, the gate's squeeze-excitation, the classifier) -- so that the network
computes exactly the same function at full width (tested).

A **channel space** is a set of stages whose widths are tied: stages joined by
an identity shortcut add their features, so they must share one width and one
channel order. Width units: a DS-ResNet stage's width counts *planes*; a
bottleneck's residual stream has ``expansion`` channels per unit, so its axes
carry ``scale=4`` and unit ``u`` covers channels ``[4u, 4u + 4)``, which keeps
prefix slicing intact (``w`` units = the first ``4w`` channels).

DS-ResNet has a channel map, and DS-ViT with ``separate_dims=True``: its heads
(unit: one head, ``head_dim`` channels in each of the q, k and v row blocks of
the fused ``qkv`` weight: ``segments=3``) and MLP hidden units (see
:func:`channel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsnet.models.base import DynamicNet

__all__ = ["ChannelAxis", "ChannelSpace", "channel_map", "permute_space_", "expand_units"]


@dataclass(frozen=True)
class ChannelAxis:
    """One tensor axis indexed by a space's channels."""

    name: str  # a parameter or buffer name of the model (``model.state_dict()`` key)
    dim: int  # the axis
    scale: int  # channels per width unit (bottleneck residual: the expansion)
    producer: bool  # a weight whose rows *make* these channels (where the search injects noise)
    segments: int = 1  # the axis is this many equal blocks, each indexed alike (fused q|k|v rows: 3)

    def index(self, unit_order: Tensor, size: int) -> Tensor:
        """Indices along an axis of length ``size`` that put unit ``unit_order[j]`` at position ``j``."""
        idx = expand_units(unit_order, self.scale)
        if self.segments == 1:
            return idx
        step = size // self.segments
        return torch.cat([idx + s * step for s in range(self.segments)])


@dataclass(frozen=True)
class ChannelSpace:
    """Stages sharing one width and one channel order, and every axis their channels index."""

    stages: tuple[int, ...]
    units: int  # full width in units
    axes: tuple[ChannelAxis, ...]
    group: int | None = None  # width units per channel group fixed by the family (one head); None: the search's

    def producers(self) -> list[ChannelAxis]:
        return [a for a in self.axes if a.producer]


def expand_units(unit_index: Tensor, scale: int) -> Tensor:
    """Channel indices of width units: unit ``u`` covers channels ``[scale*u, scale*u + scale)``."""
    if scale == 1:
        return unit_index
    return (unit_index[:, None] * scale + torch.arange(scale, device=unit_index.device)).flatten()


def channel_map(model: DynamicNet) -> list[ChannelSpace]:
    """The channel spaces of ``model``, in stage order. Raises ValueError for families without a map."""
    from dsnet.models.resnet import DSResNet
    from dsnet.models.vit import DSViT

    if isinstance(model, DSResNet):
        return _resnet_spaces(model)
    if isinstance(model, DSViT) and model.separate_dims:
        return _vit_spaces(model)
    hint = " and DS-ViT with separate_dims=True" if isinstance(model, DSViT) else ""
    raise ValueError(
        f"no channel map for {type(model).__name__}: progressive sub-network search supports DS-ResNet models{hint}"
    )


def _vit_spaces(model) -> list[ChannelSpace]:
    """DS-ViT, separate dimensions: per block group, one space of heads and one of MLP hidden units.

    A group's blocks share one order of each (as a DS-ResNet stage's blocks
    share one order of planes). Permuting heads reorders whole heads: their
    rows in each of the q, k, v blocks of ``qkv`` and their columns of
    ``proj``; permuting hidden units reorders ``fc1`` rows and ``fc2``
    columns. Both leave the full network's function unchanged. The embedding
    dims have no space: the residual stream is one order for every group,
    the pre-gate ones included, so it cannot be re-ordered for the post-gate
    groups alone (the search keeps each group's embedding width).
    """
    hd = model.head_dim
    spaces = []
    for group in range(1, len(model.block_dims(0)) + 1):
        _, heads_stage, mlp_stage = model.group_stages(group)
        heads: list[ChannelAxis] = []
        mlp: list[ChannelAxis] = []
        for i, block in enumerate(model.blocks):
            if model.block_group(i) != group:
                continue
            p = f"blocks.{i}"
            heads.append(ChannelAxis(f"{p}.attn.qkv.weight", 0, hd, True, segments=3))
            if block.attn.qkv.bias is not None:
                heads.append(ChannelAxis(f"{p}.attn.qkv.bias", 0, hd, False, segments=3))
            heads.append(ChannelAxis(f"{p}.attn.proj.weight", 1, hd, False))
            mlp += [
                ChannelAxis(f"{p}.mlp.fc1.weight", 0, 1, True),
                ChannelAxis(f"{p}.mlp.fc1.bias", 0, 1, False),
                ChannelAxis(f"{p}.mlp.fc2.weight", 1, 1, False),
            ]
        block = model.blocks[0]
        spaces.append(ChannelSpace((heads_stage,), block.num_heads, tuple(heads), group=1))
        spaces.append(ChannelSpace((mlp_stage,), block.mlp_hidden, tuple(mlp)))
    return spaces


def _resnet_spaces(model) -> list[ChannelSpace]:
    """DS-ResNet: a stage's planes (inner channels of its blocks) and residual stream share one order.

    The inner channels and the residual channels of a stage are different
    features, but DS-ResNet slices both with the stage's one width (``planes``
    and ``planes * expansion``), so one ranking of width units orders both:
    group ``g`` of a stage is planes ``[gG, gG + G)`` *and* the residual
    channels those units cover [ours: tying them keeps the family's one-width-
    per-stage design; the noise of a group perturbs both].
    """
    e = model.expansion
    blocks = model.blocks
    stages = model.block_stages
    n_stages = len(model.subnets[0].widths)
    last = n_stages - 1

    def conv(prefix: str, module, out_scale: int | None, in_scale: int | None) -> list[ChannelAxis]:
        axes = []
        if out_scale is not None:
            axes.append(ChannelAxis(f"{prefix}.weight", 0, out_scale, True))
            if module.bias is not None:
                axes.append(ChannelAxis(f"{prefix}.bias", 0, out_scale, False))
        if in_scale is not None:
            axes.append(ChannelAxis(f"{prefix}.weight", 1, in_scale, False))
        return axes

    def bn(prefix: str, scale: int) -> list[ChannelAxis]:
        return [
            ChannelAxis(f"{prefix}.weight", 0, scale, False),
            ChannelAxis(f"{prefix}.bias", 0, scale, False),
            ChannelAxis(f"{prefix}.running_mean", 1, scale, False),  # (slots, channels)
            ChannelAxis(f"{prefix}.running_var", 1, scale, False),
        ]

    def input_stage(i: int) -> int:
        return stages[i] - 1 if i == 0 or stages[i - 1] != stages[i] else stages[i]

    per_stage: dict[int, list[ChannelAxis]] = {s: [] for s in range(n_stages)}
    out_scale = {0: 1, **{s: e for s in range(1, n_stages)}}
    per_stage[0] += conv("stem", model.stem, 1, None) + bn("stem_bn", 1)
    for i, blk in enumerate(blocks):
        s, p = stages[i], f"blocks.{i}"
        axes = conv(f"{p}.conv1", blk.conv1, 1, None) + bn(f"{p}.bn1", 1)
        if hasattr(blk, "conv3"):  # bottleneck: conv2 maps planes to planes, conv3 planes to the residual
            axes += conv(f"{p}.conv2", blk.conv2, 1, 1) + bn(f"{p}.bn2", 1)
            axes += conv(f"{p}.conv3", blk.conv3, e, 1) + bn(f"{p}.bn3", e)
        else:
            axes += conv(f"{p}.conv2", blk.conv2, e, 1) + bn(f"{p}.bn2", e)
        if blk.shortcut is not None:
            axes += conv(f"{p}.shortcut.conv", blk.shortcut.conv, e, None) + bn(f"{p}.shortcut.bn", e)
        per_stage[s] += axes
        # the block reads the stream of its input stage
        src = input_stage(i)
        per_stage[src] += conv(f"{p}.conv1", blk.conv1, None, out_scale[src])
        if blk.shortcut is not None:
            per_stage[src] += conv(f"{p}.shortcut.conv", blk.shortcut.conv, None, out_scale[src])
    gate_src = model.gate_stage - 1
    gate = model.gate_state_prefix
    per_stage[gate_src] += [
        ChannelAxis(f"{gate}reduce.weight", 1, out_scale[gate_src], False),
        ChannelAxis(f"{gate}expand.weight", 0, out_scale[gate_src], False),
        ChannelAxis(f"{gate}expand.bias", 0, out_scale[gate_src], False),
    ]
    per_stage[last] += [ChannelAxis("classifier.weight", 1, out_scale[last], False)]

    # stages joined by an identity shortcut share one space (union-find over the stage indices)
    parent = list(range(n_stages))

    def find(s: int) -> int:
        while parent[s] != s:
            s = parent[s]
        return s

    for i, blk in enumerate(blocks):
        if blk.shortcut is None and input_stage(i) != stages[i]:
            parent[find(stages[i])] = find(input_stage(i))
    units = {0: model.stem.out_channels, **{stages[i]: blk.conv1.out_channels for i, blk in enumerate(blocks)}}
    spaces = []
    for root in sorted({find(s) for s in range(n_stages)}):
        members = tuple(s for s in range(n_stages) if find(s) == root)
        sizes = {units[s] for s in members}
        if len(sizes) != 1:
            raise ValueError(f"stages {members} share a channel order but have different sizes {sorted(sizes)}")
        axes = tuple(a for s in members for a in per_stage[s])
        spaces.append(ChannelSpace(members, sizes.pop(), axes))
    return spaces


@torch.no_grad()
def permute_space_(model: DynamicNet, space: ChannelSpace, order: Tensor) -> None:
    """Reorder the space's channels in place: new unit ``j`` is old unit ``order[j]``.

    Every axis the space's channels index is permuted, every BatchNorm slot
    included, so the network computes the same function at full width; only
    which channels a prefix slice keeps changes.
    """
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(space.units)):
        raise ValueError(f"order must be a permutation of 0..{space.units - 1}, got {order.tolist()}")
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for axis in space.axes:
        t = tensors[axis.name]
        idx = axis.index(order, t.shape[axis.dim]).to(t.device)
        t.copy_(t.index_select(axis.dim, idx))
