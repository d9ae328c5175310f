"""DS-MobileNetV1, the official DS-Net architecture (SPEC section 5).

Stem 3x3 conv, then depthwise-separable blocks (3x3 depthwise, BN, Swish,
squeeze-excitation, 1x1 pointwise, BN, Swish), no skip connections, global
pooling, dropout, classifier. The gate is the squeeze-excitation of the first
block of the routed stage: it sees that block's depthwise features, and its
decision sets the width of that block's pointwise output and of every later
layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.gate import DynamicGate, SqueezeExcite
from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear, conv_bn
from dsnet.models.base import DynamicNet
from dsnet.models.registry import register_model
from dsnet.models.static import StaticDepthwiseSeparable, conv_bn_act

__all__ = ["DSMobileNetV1", "MBStage", "ds_mobilenet_v1", "ds_mobilenet_v1_cifar"]


@dataclass(frozen=True)
class MBStage:
    widths: tuple[int, ...]  # output channel choices
    depth: int  # blocks
    stride: int  # of the first block


# The official slimmable_mbnet_v1_bn_uniform: stem [16, 24], then five stages.
OFFICIAL_STAGES = (
    MBStage((32, 88), 1, 1),
    MBStage((48, 168), 2, 2),
    MBStage((96, 264), 2, 2),
    MBStage(tuple(range(224, 640 + 1, 32)), 6, 2),  # the gate lives in this stage's first block
    MBStage(tuple(range(736, 1152 + 1, 32)), 2, 2),
)


class DSDepthwiseSeparable(nn.Module):
    """Depthwise-separable block whose pointwise output width is chosen per call."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        num_slots: int,
        se_ratio: float,
        gate_choices: int = 0,
    ) -> None:
        super().__init__()
        self.dw = SlicedConv2d(in_channels, in_channels, 3, stride, depthwise=True)
        self.bn1 = SlicedBatchNorm2d(in_channels, num_slots)
        self.se = (
            DynamicGate(in_channels, gate_choices, se_ratio) if gate_choices else SqueezeExcite(in_channels, se_ratio)
        )
        self.pw = SlicedConv2d(in_channels, out_channels, 1)
        self.bn2 = SlicedBatchNorm2d(out_channels, num_slots)

    def forward_pre(self, x: Tensor, in_slot: int) -> tuple[Tensor, Tensor]:
        """Depthwise part and attention; its widths depend only on the input."""
        x = F.silu(conv_bn(self.dw, self.bn1, x, in_slot))
        z = self.se.encode(x)
        return self.se.attend(x, z), z

    def forward_post(self, h: Tensor, width: int, slot: int) -> Tensor:
        return F.silu(conv_bn(self.pw, self.bn2, h, slot, width))

    def forward(self, x: Tensor, width: int, in_slot: int, slot: int) -> Tensor:
        h, _ = self.forward_pre(x, in_slot)
        return self.forward_post(h, width, slot)

    def to_static(self, in_width: int, width: int, in_slot: int, slot: int) -> StaticDepthwiseSeparable:
        return StaticDepthwiseSeparable(
            conv_bn_act(self.dw.to_static(in_width), self.bn1.to_static(in_width, in_slot), nn.SiLU()),
            self.se.to_static(in_width),
            conv_bn_act(self.pw.to_static(in_width, width), self.bn2.to_static(width, slot), nn.SiLU()),
        )


class DSMobileNetV1(DynamicNet):
    """Dynamic slimmable MobileNetV1.

    Args:
        stem_widths: channel choices of the stem convolution.
        stages: width choices, depth and stride of each stage.
        gate_stage: index (in ``stage_names``; the stem is 0) of the first
            routed stage; the gate sits in its first block.
        routing_space: indices of ``subnets`` the gate chooses among
            (default: the slimmest four routed sub-networks).
        gate_mode: ``"exit"`` (the default with two or more routing choices; what the measurements
            support) or ``"pre"`` (the paper's gate); see :meth:`DynamicNet.set_gate_mode`.
        subnet_widths: an explicit list of sub-networks (per-stage widths, slimmest first) instead of
            the index-aligned stage choices; layer sizes still come from the stages' widest choices.
        router: ``"logits"`` (the paper's gate logits) or ``"utility"`` (per-choice P(correct); see
            :class:`DynamicNet`).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_widths: Sequence[int] = (16, 24),
        stem_stride: int = 2,
        stages: Sequence[MBStage] = OFFICIAL_STAGES,
        gate_stage: int = 4,
        routing_space: Sequence[int] | None = None,
        se_ratio: float = 0.25,
        drop_rate: float = 0.2,
        input_size: int = 224,
        gate_mode: str | None = None,
        subnet_widths: Sequence[Sequence[int]] | None = None,
        router: str = "logits",
    ) -> None:
        # stages from a YAML config arrive as [widths, depth, stride] lists
        stages = tuple(s if isinstance(s, MBStage) else MBStage(tuple(s[0]), *s[1:]) for s in stages)
        if se_ratio <= 0 or not 0 <= drop_rate < 1:
            raise ValueError(f"se_ratio must be positive and drop_rate in [0, 1), got {se_ratio}, {drop_rate}")
        if any(s.depth < 1 or s.stride < 1 for s in stages):
            raise ValueError(f"every stage needs depth >= 1 and stride >= 1, got {list(stages)}")
        stage_names = ("stem",) + tuple(f"s{i}" for i in range(len(stages)))
        stage_widths = [tuple(stem_widths)] + [tuple(s.widths) for s in stages]
        super().__init__(
            stage_names,
            stage_widths,
            gate_stage,
            in_chans,
            num_classes,
            (in_chans, input_size, input_size),
            routing_space,
            subnet_widths,
            router=router,
        )
        slots = self.num_slots
        self.drop_rate = drop_rate
        self.stem = SlicedConv2d(in_chans, max(stem_widths), 3, stem_stride)
        self.stem_bn = SlicedBatchNorm2d(max(stem_widths), slots)
        self.blocks = nn.ModuleList()
        self._block_stage: list[int] = []  # stage index (in stage_names) of each block
        self._block_first: list[bool] = []
        in_ch = max(stem_widths)
        for si, stage in enumerate(stages, start=1):
            for b in range(stage.depth):
                has_gate = si == gate_stage and b == 0
                gate_choices = len(self.routing_space) if has_gate else 0
                block = DSDepthwiseSeparable(
                    in_ch, max(stage.widths), stage.stride if b == 0 else 1, slots, se_ratio, gate_choices
                )
                if has_gate:
                    self.gate_block = len(self.blocks)
                self.blocks.append(block)
                self._block_stage.append(si)
                self._block_first.append(b == 0)
                in_ch = max(stage.widths)
        self.classifier = SlicedLinear(in_ch, num_classes)
        self.set_gate_mode(gate_mode)

    @property
    def gate(self) -> DynamicGate:  # type: ignore[override]
        return self.blocks[self.gate_block].se

    def _block_args(self, i: int, subnet: int) -> tuple[int, int, int]:
        s = self._block_stage[i]
        slots = self.slots(subnet)
        in_slot = slots[s - 1] if self._block_first[i] else slots[s]
        return self.subnets[subnet].widths[s], in_slot, slots[s]

    def forward_pre(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        x = F.silu(conv_bn(self.stem, self.stem_bn, x, slots[0], widths[0]))
        for i in range(self.gate_block):
            x = self.blocks[i](x, *self._block_args(i, subnet))
        _, in_slot, _ = self._block_args(self.gate_block, subnet)
        return self.blocks[self.gate_block].forward_pre(x, in_slot)

    def forward_post(self, h: Tensor, subnet: int) -> Tensor:
        width, _, slot = self._block_args(self.gate_block, subnet)
        x = self.blocks[self.gate_block].forward_post(h, width, slot)
        for i in range(self.gate_block + 1, len(self.blocks)):
            x = self.blocks[i](x, *self._block_args(i, subnet))
        x = x.mean((2, 3))
        if subnet == self.largest and self.drop_rate > 0:  # as official: dropout on the largest only
            x = F.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)

    def build_static(self, subnet: int) -> nn.Sequential:
        return nn.Sequential(*self._static_blocks(subnet))

    def build_static_trunk(self, subnet: int) -> nn.Sequential:
        """Up to the gate's input: the stem, the blocks before the gate's block, and that block's depthwise part."""
        layers = self._static_blocks(subnet, stop=self.gate_block + 1)
        return nn.Sequential(*layers[:-1], layers[-1].dw)

    def build_static_post(self, subnet: int) -> nn.Sequential:
        """From the gate's output: the gate block's pointwise part, the blocks after it and the classifier."""
        layers = self._static_blocks(subnet, start=self.gate_block)
        return nn.Sequential(layers[0].pw, *layers[1:])

    def _static_blocks(self, subnet: int, start: int = -1, stop: int | None = None) -> list[nn.Module]:
        """Plain layers of sub-network ``subnet``: the stem (``start`` < 0), blocks ``start``..``stop`` - 1 (as
        :class:`StaticDepthwiseSeparable`), and the classifier when ``stop`` is None."""
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        layers: list[nn.Module] = []
        if start < 0:
            layers.append(
                conv_bn_act(
                    self.stem.to_static(self.in_chans, widths[0]),
                    self.stem_bn.to_static(widths[0], slots[0]),
                    nn.SiLU(),
                )
            )
        in_width = widths[0]
        for i, block in enumerate(self.blocks[: len(self.blocks) if stop is None else stop]):
            width, in_slot, slot = self._block_args(i, subnet)
            if i >= start:
                layers.append(block.to_static(in_width, width, in_slot, slot))
            in_width = width
        if stop is None:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if subnet == self.largest and self.drop_rate > 0:
                layers.append(nn.Dropout(self.drop_rate))
            layers.append(self.classifier.to_static(in_width))
        return layers


@register_model(input_size=224)
def ds_mobilenet_v1(**kwargs) -> DSMobileNetV1:
    """The official DS-MobileNetV1: 14 routed sub-networks (133M..565M MACs) plus the training-only largest."""
    return DSMobileNetV1(**kwargs)


# A small-image variant (28-32 px) for CPU experiments: stride-1 stem, three
# downsamplings, the gate in the fourth of five stages as in the official model.
CIFAR_STAGES = (
    MBStage((32, 48), 1, 1),
    MBStage((48, 96), 2, 2),
    MBStage((96, 160), 2, 2),
    MBStage(tuple(range(64, 256 + 1, 32)), 2, 1),
    MBStage(tuple(range(128, 512 + 1, 64)), 2, 2),
)


@register_model(input_size=32)
def ds_mobilenet_v1_cifar(**kwargs) -> DSMobileNetV1:
    """DS-MobileNetV1 for 28-32 px images: 7 routed sub-networks, trains on a CPU."""
    kwargs.setdefault("stem_stride", 1)
    kwargs.setdefault("stages", CIFAR_STAGES)
    kwargs.setdefault("input_size", 32)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("drop_rate", 0.1)
    return DSMobileNetV1(stem_widths=kwargs.pop("stem_widths", (16, 24)), **kwargs)
