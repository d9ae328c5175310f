"""Static building blocks for extracted sub-networks.

``model.extract(k)`` returns an ``nn.Sequential`` of plain ``torch.nn`` layers
and the few wiring modules below (attention multiply, residual add), so the
result has no sliced layer, no width arguments and no dsnet state: it can be
saved, exported, quantised or compiled like any torchvision model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "StaticSqueezeExcite",
    "StaticDepthwiseSeparable",
    "StaticResidual",
    "ChannelMatch",
    "match_channels",
    "conv_bn_act",
]


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [conv, bn]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class StaticSqueezeExcite(nn.Module):
    """``x * gain * sigmoid(expand(relu(reduce(GAP(x)))))`` (gain 1: plain squeeze-excitation)."""

    def __init__(self, reduce: nn.Linear, expand: nn.Linear, gain: float = 1.0) -> None:
        super().__init__()
        self.reduce = reduce
        self.expand = expand
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.reduce(x.mean((2, 3))))
        attn = torch.sigmoid(self.expand(z))
        if self.gain != 1.0:
            attn = attn * self.gain
        return x * attn[:, :, None, None]


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
    """``act(body(x) + shortcut(x))``."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))
