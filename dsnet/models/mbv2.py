"""DS-MobileNetV2: inverted-residual supernets that slice widths *and* depthwise kernel sizes (DS-Net++ [paper]).

The search space has the shape of once-for-all's (Cai et al., ICLR 2020)
MobileNetV2 space: blocks of 1x1 expansion (ratio ``t``), ``k x k``
depthwise with ``k`` in {3, 5, 7}, 1x1 linear projection, a residual add
when the block keeps its stage's shape; a 3x3 stem, a 1x1 head convolution,
global pooling, a classifier; ReLU6 throughout. The depthwise kernel is a
centre crop of the stored 7x7 (:class:`~dsnet.layers.kernel.KernelSlicedConv2d`;
``kernel_transform=True`` adds once-for-all's kernel transformation matrices).

A sub-network is a width per stage and a kernel size per stage
(:class:`~dsnet.models.base.Subnet` ``kernels``). By default the sub-networks
are the grid [ours] of the routed width choices (index-aligned across the
routed stages and the head, as every dsnet family) times ``kernel_choices``
(one kernel for every routed stage), ordered by multiply-adds; the stages
before the gate run at their one width with ``pre_gate_kernel``. Stage I's
sandwich rule samples that grid: the largest is the widest with the largest
kernel, the smallest the slimmest with the smallest kernel, the random ones
any mix. The gate routes among ``routing_space``: by default the grid's
sub-networks whose kernel is in ``routing_kernels`` (default the smallest
and the largest kernel: 2 x the width choices, pairs that differ only in
kernel). Every (width, kernel) combination has private BatchNorm statistics.
``model(x, width=r)`` and ``supernet.width_sampling=continuous`` choose by
width alone (``DynamicNet.subnet_for_width``: ties go to the lowest index, the
cheapest kernel at that width), so train kernel choices with the default
discrete sampling.

The gate sits before the first block of ``gate_stage`` (as DS-ResNet's): its
attention head reweights the last pre-gate feature map and its decision fixes
every later width and kernel. Residual adds are placed where a block keeps its
stage's width and resolution (every block of a stage but the first) [ours].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.gate import DynamicGate, make_divisible
from dsnet.layers.kernel import KernelSlicedConv2d, check_kernel_sizes, kernel_conv_bn
from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear, conv_bn
from dsnet.models.base import DynamicNet
from dsnet.models.registry import register_model
from dsnet.models.static import SplitAtGate, StaticLayers, StaticResidual, conv_bn_act

__all__ = ["IRStage", "DSInvertedResidual", "DSMobileNetV2", "hidden_width", "ds_mbv2_tiny", "ds_mbv2_cifar"]


@dataclass(frozen=True)
class IRStage:
    """One stage of inverted-residual blocks."""

    widths: tuple[int, ...]  # output channel choices (one for a stage before the gate)
    depth: int  # blocks
    stride: int  # of the first block
    expand: float = 6.0  # expansion ratio t: hidden channels = t x the block's input channels


def hidden_width(in_width: int, expand: float) -> int:
    """Hidden (depthwise) channels of a block reading ``in_width`` channels: ``t * in``, a multiple of 8 (t = 1: in)."""
    return in_width if expand == 1 else make_divisible(in_width * expand, 8)


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # "same" padding, odd kernels


class DSInvertedResidual(nn.Module):
    """1x1 expansion, ``k x k`` depthwise (kernel chosen per call), 1x1 linear projection, optional residual add."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand: float,
        kernel_sizes: Sequence[int],
        num_slots: int,
        residual: bool,
        kernel_transform: bool = False,
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual block keeps its input's shape: stride 1, as many outputs as inputs")
        self.expand_ratio = expand
        hidden = hidden_width(in_channels, expand)
        self.expand = SlicedConv2d(in_channels, hidden, 1) if expand != 1 else None
        self.bn0 = SlicedBatchNorm2d(hidden, num_slots) if expand != 1 else None
        self.dw = KernelSlicedConv2d(hidden, hidden, kernel_sizes, stride, depthwise=True, transform=kernel_transform)
        self.bn1 = SlicedBatchNorm2d(hidden, num_slots)
        self.project = SlicedConv2d(hidden, out_channels, 1)
        self.bn2 = SlicedBatchNorm2d(out_channels, num_slots)
        self.residual = residual

    def forward(self, x: Tensor, width: int, kernel: int, in_slot: int, slot: int) -> Tensor:
        """``width`` output channels, depthwise ``kernel``; the expansion's BN reads ``in_slot``, the rest ``slot``."""
        h = x
        if self.expand is not None:
            h = F.relu6(conv_bn(self.expand, self.bn0, h, in_slot, hidden_width(x.shape[1], self.expand_ratio)))
        h = F.relu6(kernel_conv_bn(self.dw, self.bn1, h, slot, None, kernel))
        h = conv_bn(self.project, self.bn2, h, slot, width)
        return x + h if self.residual else h

    def to_static(self, in_width: int, width: int, kernel: int, in_slot: int, slot: int) -> nn.Module:
        hidden = hidden_width(in_width, self.expand_ratio)
        layers: list[nn.Module] = []
        if self.expand is not None:
            layers.append(
                conv_bn_act(self.expand.to_static(in_width, hidden), self.bn0.to_static(hidden, in_slot), nn.ReLU6())
            )
        layers.append(
            conv_bn_act(self.dw.to_static(hidden, None, kernel), self.bn1.to_static(hidden, slot), nn.ReLU6())
        )
        layers.append(conv_bn_act(self.project.to_static(hidden, width), self.bn2.to_static(width, slot), None))
        body = nn.Sequential(*layers)
        if not self.residual:
            return body
        if in_width != width:
            raise ValueError(f"a residual block needs as many input as output channels, got {in_width} -> {width}")
        return StaticResidual(body, nn.Identity(), nn.Identity())


class DSMobileNetV2(SplitAtGate, DynamicNet):
    """Dynamic slice-able MobileNetV2: widths and depthwise kernel sizes routed per input.

    Args:
        stem_width: channels of the 3x3 stem convolution.
        stem_stride: its stride.
        stages: :class:`IRStage` per stage (or ``[widths, depth, stride, expand]`` lists from a config);
            stages before ``gate_stage`` have one width, the routed ones the same number of choices each.
        head_widths: channel choices of the final 1x1 convolution (as many as the routed stages have).
        gate_stage: index (in ``stage_names``; the stem is 0) of the first routed stage; the gate sits
            before its first block.
        kernel_choices: depthwise kernel sizes of the routed stages (odd; centre crops of the largest).
        pre_gate_kernel: depthwise kernel size of the stages before the gate.
        routing_kernels: the kernels whose sub-networks form the default routing space (default: the
            smallest and the largest of ``kernel_choices``; ``[7]`` routes among widths only at 7x7).
        routing_space: indices of ``subnets`` the gate chooses among (overrides ``routing_kernels``).
        kernel_transform: once-for-all's kernel transformation matrices (off: plain centre crops).
        gate_se_ratio: width of the gate's shared encoder as a fraction of its input channels.
        drop_rate: dropout before the classifier, on the largest sub-network only (as DS-MobileNetV1).
        subnet_widths: an explicit list of sub-networks (per-stage widths, smallest first) instead of
            the grid; ``subnet_kernels`` gives their kernel sizes per stage (default: the largest of
            ``kernel_choices`` in the routed stages).
        gate_mode, router: as every dsnet family (see :class:`DynamicNet`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        stem_width: int = 16,
        stem_stride: int = 1,
        stages: Sequence[IRStage] = (),
        head_widths: Sequence[int] = (),
        gate_stage: int = 3,
        kernel_choices: Sequence[int] = (3, 5, 7),
        pre_gate_kernel: int = 3,
        routing_kernels: Sequence[int] | None = None,
        routing_space: Sequence[int] | None = None,
        kernel_transform: bool = False,
        gate_se_ratio: float = 0.25,
        drop_rate: float = 0.0,
        input_size: int = 32,
        gate_mode: str | None = None,
        subnet_widths: Sequence[Sequence[int]] | None = None,
        subnet_kernels: Sequence[Sequence[int]] | None = None,
        router: str = "logits",
    ) -> None:
        stages = tuple(s if isinstance(s, IRStage) else IRStage(tuple(s[0]), *s[1:]) for s in stages)
        if not stages or any(s.depth < 1 or s.stride < 1 or s.expand < 1 for s in stages):
            raise ValueError(f"give at least one stage, each with depth, stride and expand >= 1, got {list(stages)}")
        if not 0 < gate_stage <= len(stages):
            raise ValueError(f"gate_stage must name one of the block stages 1..{len(stages)}, got {gate_stage}")
        if gate_se_ratio <= 0 or not 0 <= drop_rate < 1:
            raise ValueError(
                f"gate_se_ratio must be positive and drop_rate in [0, 1), got {gate_se_ratio}, {drop_rate}"
            )
        kernels = check_kernel_sizes(kernel_choices)
        pre_k = check_kernel_sizes([pre_gate_kernel])[0]
        pre_stages, routed_stages = stages[: gate_stage - 1], stages[gate_stage - 1 :]
        multi = [i + 1 for i, s in enumerate(pre_stages) if len(s.widths) != 1]
        if multi:
            raise ValueError(f"stages before the gate run at one width: stage(s) {multi} have several")
        n = len(head_widths)
        uneven = [i + gate_stage for i, s in enumerate(routed_stages) if len(s.widths) != n]
        if not n or uneven:
            raise ValueError(
                f"the routed stages and head_widths need the same number of width choices ({n} in head_widths), "
                f"stage(s) {uneven} differ"
            )
        stage_names = ("stem",) + tuple(f"s{i + 1}" for i in range(len(stages))) + ("head",)
        stage_widths = [(stem_width,), *(tuple(s.widths) for s in stages), tuple(head_widths)]
        for name, widths in zip(stage_names, stage_widths):
            if list(widths) != sorted(set(widths)) or widths[0] < 1:
                raise ValueError(
                    f"stage {name!r}: widths must be positive, distinct and increasing, got {list(widths)}"
                )
        fixed = (3,) + (pre_k,) * len(pre_stages)
        choices = [(3,), *((pre_k,) for _ in pre_stages), *(kernels for _ in routed_stages), (1,)]
        plan = _block_plan(stages)
        size = (in_chans, input_size, input_size)

        def kernels_of(k: int) -> tuple[int, ...]:
            return fixed + (k,) * len(routed_stages) + (1,)

        if subnet_widths is None:
            grid = [
                (tuple(w[0] for w in stage_widths[:gate_stage]) + tuple(w[i] for w in stage_widths[gate_stage:]), k)
                for i in range(n)
                for k in kernels
            ]
            grid.sort(key=lambda wk: _approx_macs(size, stem_stride, plan, wk[0], kernels_of(wk[1]), num_classes))
            subnet_widths = [list(w) for w, _ in grid]
            subnet_kernels = [list(kernels_of(k)) for _, k in grid]
            if routing_space is None:
                keep = (
                    set(check_kernel_sizes(routing_kernels))
                    if routing_kernels is not None
                    else {kernels[0], kernels[-1]}
                )
                if not keep <= set(kernels):
                    raise ValueError(f"routing_kernels {sorted(keep)} must be among kernel_choices {list(kernels)}")
                routing_space = [i for i, (_, k) in enumerate(grid) if k in keep]
        elif subnet_kernels is None:
            subnet_kernels = [list(kernels_of(kernels[-1])) for _ in subnet_widths]
        super().__init__(
            stage_names,
            stage_widths,
            gate_stage,
            in_chans,
            num_classes,
            size,
            routing_space,
            subnet_widths,
            router=router,
            subnet_kernels=subnet_kernels,
            stage_kernel_choices=choices,
        )
        slots = self.num_slots
        self.drop_rate = drop_rate
        self.kernel_choices = kernels
        self.stem = SlicedConv2d(in_chans, stem_width, 3, stem_stride)
        self.stem_bn = SlicedBatchNorm2d(stem_width, slots)
        self.blocks = nn.ModuleList()
        self._block_stage: list[int] = []
        self._block_first: list[bool] = []
        in_ch = stem_width
        for s, stage in enumerate(stages, start=1):
            ks = kernels if s >= gate_stage else (pre_k,)
            for b in range(stage.depth):
                out = max(stage.widths)
                self.blocks.append(
                    DSInvertedResidual(
                        in_ch, out, stage.stride if b == 0 else 1, stage.expand, ks, slots, b > 0, kernel_transform
                    )
                )
                self._block_stage.append(s)
                self._block_first.append(b == 0)
                in_ch = out
        self.gate_block = self._block_stage.index(gate_stage)
        gate_channels = stage_widths[gate_stage - 1][0]
        self._gate = DynamicGate(gate_channels, len(self.routing_space), gate_se_ratio)
        self.set_gate_mode(gate_mode)
        self.head = SlicedConv2d(in_ch, max(head_widths), 1)
        self.head_bn = SlicedBatchNorm2d(max(head_widths), slots)
        self.classifier = SlicedLinear(max(head_widths), num_classes)

    @property
    def gate(self) -> DynamicGate:  # type: ignore[override]
        return self._gate

    def _block_args(self, i: int, subnet: int) -> tuple[int, int, int, int]:
        s = self._block_stage[i]
        net, slots = self.subnets[subnet], self.slots(subnet)
        in_slot = slots[s - 1] if self._block_first[i] else slots[s]
        return net.widths[s], net.kernels[s], in_slot, slots[s]  # type: ignore[index]

    def _run_blocks(self, x: Tensor, subnet: int, start: int, stop: int) -> Tensor:
        for i in range(start, stop):
            x = self.blocks[i](x, *self._block_args(i, subnet))
        return x

    def forward_pre(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        x = F.relu6(conv_bn(self.stem, self.stem_bn, x, slots[0], widths[0]))
        return self.forward_gate(self._run_blocks(x, subnet, 0, self.gate_block), subnet)

    def forward_post(self, h: Tensor, subnet: int) -> Tensor:
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        x = self._run_blocks(h, subnet, self.gate_block, len(self.blocks))
        x = F.relu6(conv_bn(self.head, self.head_bn, x, slots[-1], widths[-1]))
        x = x.mean((2, 3))
        if subnet == self.largest and self.drop_rate > 0:  # as DS-MobileNetV1: dropout on the largest only
            x = F.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)

    def _static_layers(self, subnet: int, part: str = "all") -> StaticLayers:
        """Plain layers of sub-network ``subnet``: (before the gate, the gate's attention, after it); ``part``
        ("trunk", "post" or "all") says which are built (the others come back empty / None)."""
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        trunk: list[nn.Module] = []
        post: list[nn.Module] = []
        if part != "post":
            trunk.append(self._static_stem(subnet, nn.ReLU6()))
        gate = None
        in_width = widths[0]
        for i, block in enumerate(self.blocks):
            if i == self.gate_block and part == "all":
                gate = self._gate.to_static(in_width)
            width, kernel, in_slot, slot = self._block_args(i, subnet)
            layers = trunk if i < self.gate_block else post
            if layers is trunk and part != "post" or layers is post and part != "trunk":
                layers.append(block.to_static(in_width, width, kernel, in_slot, slot))
            in_width = width
        if part != "trunk":
            post.append(
                conv_bn_act(
                    self.head.to_static(in_width, widths[-1]),
                    self.head_bn.to_static(widths[-1], slots[-1]),
                    nn.ReLU6(),
                )
            )
            post += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if subnet == self.largest and self.drop_rate > 0:
                post.append(nn.Dropout(self.drop_rate))
            post.append(self.classifier.to_static(widths[-1]))
        return trunk, gate, post


def _block_plan(stages: Sequence[IRStage]) -> list[tuple[int, int, float, bool]]:
    """(stage index, stride, expansion, first of its stage) per block."""
    return [
        (s, stage.stride if b == 0 else 1, stage.expand, b == 0)
        for s, stage in enumerate(stages, start=1)
        for b in range(stage.depth)
    ]


def _approx_macs(
    size: tuple[int, int, int],
    stem_stride: int,
    plan: Sequence[tuple[int, int, float, bool]],
    widths: Sequence[int],
    kernels: Sequence[int],
    num_classes: int,
) -> int:
    """The convolutions' and classifier's multiply-adds of one grid sub-network: only to order the grid.

    (The gate, common to all, is left out; ``subnet_macs`` measures the real count, and the family's tests
    check it orders the sub-networks the same way.)
    """
    c, h, w = size
    h, w = _out_size(h, stem_stride), _out_size(w, stem_stride)
    total = h * w * widths[0] * c * 9
    in_w = widths[0]
    for s, stride, expand, _ in plan:
        hidden = hidden_width(in_w, expand)
        if expand != 1:
            total += h * w * in_w * hidden
        h, w = _out_size(h, stride), _out_size(w, stride)
        total += h * w * hidden * kernels[s] ** 2 + h * w * hidden * widths[s]
        in_w = widths[s]
    return total + h * w * in_w * widths[-1] + widths[-1] * num_classes


# 28 px (Fashion-MNIST): stride-2 stem to 14x14, two thin stages before the gate (the second to 7x7), two
# routed stages (the second to 4x4) with three width choices each and depthwise kernels 3/5/7
TINY_STAGES = (
    IRStage((16,), 1, 1, 1),
    IRStage((24,), 1, 2, 4),
    IRStage((24, 32, 40), 2, 1, 4),
    IRStage((48, 64, 80), 2, 2, 4),
)


@register_model(input_size=28)
def ds_mbv2_tiny(**kwargs) -> DSMobileNetV2:
    """Inverted-residual supernet (widths x depthwise kernels 3/5/7) for 28-32 px; 6 routed choices, trains on a CPU."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_size", 28)
    kwargs.setdefault("stem_width", 16)
    kwargs.setdefault("stem_stride", 2)
    kwargs.setdefault("stages", TINY_STAGES)
    kwargs.setdefault("head_widths", (96, 128, 160))
    kwargs.setdefault("gate_stage", 3)
    # the gate sees 24 channels: as ds_resnet8_tiny, an encoder of the full width (0.25 would be 6 dims)
    kwargs.setdefault("gate_se_ratio", 1.0)
    return DSMobileNetV2(**kwargs)


# 32 px (CIFAR): stride-1 stem, MobileNetV2's expansion pattern over three downsamplings
CIFAR_STAGES = (
    IRStage((16,), 1, 1, 1),
    IRStage((24,), 2, 2, 6),
    IRStage((32, 40, 48), 2, 2, 6),
    IRStage((64, 80, 96), 2, 2, 6),
    IRStage((96, 112, 128), 1, 1, 6),
)


@register_model(input_size=32)
def ds_mbv2_cifar(**kwargs) -> DSMobileNetV2:
    """Larger inverted-residual supernet (widths x kernels 3/5/7, expansion 6) for 32 px; 6 routed choices."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_size", 32)
    kwargs.setdefault("stem_width", 16)
    kwargs.setdefault("stem_stride", 1)
    kwargs.setdefault("stages", CIFAR_STAGES)
    kwargs.setdefault("head_widths", (192, 256, 320))
    kwargs.setdefault("gate_stage", 3)
    kwargs.setdefault("drop_rate", 0.1)
    return DSMobileNetV2(**kwargs)


# the width-only control of ds_mbv2_tiny: the same blocks with 3x3 depthwise kernels only and four width
# choices (multiples of 8) spanning the same multiply-adds (1.6-4.1 MMACs against 1.6-3.9 at 28 px)
TINY_WIDTH_STAGES = (
    IRStage((16,), 1, 1, 1),
    IRStage((24,), 1, 2, 4),
    IRStage((24, 32, 40, 48), 2, 1, 4),
    IRStage((48, 64, 80, 96), 2, 2, 4),
)


@register_model(input_size=28)
def ds_mbv2_tiny_width(**kwargs) -> DSMobileNetV2:
    """Width-only control of ds_mbv2_tiny: 3x3 depthwise only, 4 routed widths over the same MMACs range."""
    kwargs.setdefault("stages", TINY_WIDTH_STAGES)
    kwargs.setdefault("head_widths", (96, 128, 160, 192))
    kwargs.setdefault("kernel_choices", (3,))
    return ds_mbv2_tiny(**kwargs)
