"""Static building blocks for extracted sub-networks.

``model.extract(k)`` returns an ``nn.Sequential`` of plain ``torch.nn`` layers
and the few wiring modules below (attention multiply, residual add), so the
result has no sliced layer, no width arguments and no dsnet state: it can be
saved, exported, quantised or compiled like any torchvision model.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.gate import StaticSqueezeExcite  # defined with the gate it is extracted from
from dsnet.layers.sliced import fold_batchnorm

# a family's plain layers of one sub-network, cut at the gate: (before it, its attention, after it)
StaticLayers = tuple[list[nn.Module], "nn.Module | None", list[nn.Module]]

__all__ = [
    "StaticLayers",
    "SplitAtGate",
    "StaticSqueezeExcite",
    "StaticDepthwiseSeparable",
    "StaticResidual",
    "ChannelMatch",
    "match_channels",
    "conv_bn_act",
    "fold_batchnorms",
    "fold_conv_bn",
    "inplace_inference",
]


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [conv, bn]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class StaticDepthwiseSeparable(nn.Module):
    def __init__(self, dw: nn.Sequential, se: nn.Module, pw: nn.Sequential) -> None:
        super().__init__()
        self.dw = dw
        self.se = se
        self.pw = pw

    def forward(self, x: Tensor) -> Tensor:
        return self.pw(self.se(self.dw(x)))


def match_channels(x: Tensor, width: int) -> Tensor:
    """``x`` with exactly ``width`` channels: the first ``width``, or zero-padded up to ``width``.

    An identity shortcut between stages of different routed widths (a basic
    block whose input comes from a slimmer pre-gate stage) reads the prefix it
    shares with the block's output; missing channels are zeros, which is what a
    prefix-sliced weight reads for features that do not exist.
    """
    ch = x.shape[1]
    if ch == width:
        return x
    if ch > width:
        return x[:, :width]
    return F.pad(x, (0, 0, 0, 0, 0, width - ch))


class ChannelMatch(nn.Module):
    """:func:`match_channels` as a module (identity shortcuts of extracted sub-networks)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        return match_channels(x, self.width)

    def extra_repr(self) -> str:
        return f"width={self.width}"


class StaticResidual(nn.Module):
    """``act(body(x) + shortcut(x))``.

    ``inplace`` (off as built; :func:`inplace_inference` turns it on in dsnet's cached plans): without autograd
    (``torch.no_grad`` / ``inference_mode``) the sum is formed in the body's output and a ReLU applied in place,
    the same values without two more full-size activations per block to allocate and write (ResNet-50's slimmest
    sub-network at batch 32 ran 15-19 % faster; ``docs/benchmarks.md``). Off, a forward hook on the body's last
    layer keeps the tensor it saw.
    """

    def __init__(self, body: nn.Sequential, shortcut: nn.Module, act: nn.Module, inplace: bool = False) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.act = act
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        short = self.shortcut(x)
        if (
            not getattr(self, "inplace", False)  # (a module pickled before the setting existed has none)
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # traced: the compiler fuses the sum; fake tensors have no storage
            or out is short
            or out.dtype != short.dtype
            or out.shape != short.shape
            or out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a body that hands back x or a view
        ):
            return self.act(out + short)
        out += short  # a fresh tensor of the body's (a convolution's): nothing else holds it
        return torch.relu_(out) if type(self.act) is nn.ReLU else self.act(out)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One ``nn.Conv2d`` (with bias) computing ``bn(conv(x))`` with ``bn``'s running statistics (eval mode)."""
    weight, bias = fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused.train(conv.training).requires_grad_(conv.weight.requires_grad)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _fold_sequential(seq: nn.Sequential) -> int:
    folded, i = 0, 0
    while i + 1 < len(seq):
        if _foldable(seq[i], seq[i + 1]):
            seq[i] = fold_conv_bn(seq[i], seq[i + 1])
            del seq[i + 1]
            folded += 1
        i += 1
    return folded


def _fold_graph(gm: fx.GraphModule) -> int:
    folded = 0
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in modules or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv, bn = modules.get(str(source.target)), modules[str(node.target)]
        if conv is None or not _foldable(conv, bn) or sum(1 for n in gm.graph.nodes if n.target == source.target) != 1:
            continue  # a convolution called twice cannot absorb one call's BatchNorm
        gm.set_submodule(str(source.target), fold_conv_bn(conv, bn))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        if not any(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
            gm.delete_submodule(str(node.target))
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


_INPLACE_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)
_FRESH_OUTPUT = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def inplace_inference(module: nn.Module) -> int:
    """Make an inference network write its activations and residual sums in place; returns how many it changed.

    Every activation that directly follows a convolution, linear layer or BatchNorm in an ``nn.Sequential`` gets a
    new ``inplace=True`` instance in its slot: its input is a fresh tensor that nothing else reads, so writing over
    it changes no value and saves one full-size activation per layer. Every :class:`StaticResidual` gets
    ``inplace=True``. For networks nobody hooks: dsnet's cached plans and ``extract(k, inplace=True)`` (a plain
    ``extract(k)`` does not call this: a forward hook on a layer whose output is then overwritten would see the new
    values).
    """
    changed = 0
    for sub in list(module.modules()):
        if isinstance(sub, StaticResidual) and not getattr(sub, "inplace", False):
            sub.inplace = True
            changed += 1
        if not isinstance(sub, nn.Sequential):
            continue
        for i in range(1, len(sub)):
            act = sub[i]
            if type(act) in _INPLACE_ACTS and not act.inplace and isinstance(sub[i - 1], _FRESH_OUTPUT):
                sub[i] = type(act)(inplace=True).train(act.training)
                changed += 1
    return changed


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` into it, in place; returns how many.

    Covers the static networks dsnet builds: ``nn.Sequential`` pairs (at any depth) and ``torch.fx`` graphs where
    the convolution's only user is the BatchNorm. The folded network computes the BatchNorms' eval-mode function
    (running statistics) in every mode: it is an inference network.
    """
    folded = 0
    for sub in list(module.modules()):
        if isinstance(sub, fx.GraphModule):
            folded += _fold_graph(sub)
        elif isinstance(sub, nn.Sequential):
            folded += _fold_sequential(sub)
    return folded


class SplitAtGate:
    """``build_static`` / ``build_static_trunk`` / ``build_static_post`` of a family from its ``_static_layers``.

    A family's ``_static_layers(subnet, part)`` returns :data:`StaticLayers` (before the gate, the gate's
    attention, after it), building only ``part`` ("trunk", "post" or "all"); this mixin (listed before
    ``DynamicNet``) assembles them as ``nn.Sequential`` networks.
    """

    def _static_layers(self, subnet: int, part: str = "all") -> StaticLayers:
        raise NotImplementedError

    def _static_stem(self, subnet: int, act: nn.Module) -> nn.Sequential:
        """The stem convolution, its BatchNorm and ``act`` at ``subnet``'s width (families with ``stem`` /
        ``stem_bn``)."""
        width, slot = self.subnets[subnet].widths[0], self.slots(subnet)[0]  # type: ignore[attr-defined]
        return conv_bn_act(self.stem.to_static(self.in_chans, width), self.stem_bn.to_static(width, slot), act)  # type: ignore[attr-defined]

    def _place_static(self, net: nn.Sequential) -> nn.Sequential:
        """Where a built network goes: as built (a family whose layers are not all built on the model's device
        and dtype moves them here)."""
        return net

    def build_static(self, subnet: int) -> nn.Sequential:
        trunk, gate, post = self._static_layers(subnet)
        return self._place_static(nn.Sequential(*trunk, gate, *post))

    def build_static_trunk(self, subnet: int) -> nn.Sequential:
        return self._place_static(nn.Sequential(*self._static_layers(subnet, "trunk")[0]))

    def build_static_post(self, subnet: int) -> nn.Sequential:
        return self._place_static(nn.Sequential(*self._static_layers(subnet, "post")[2]))
