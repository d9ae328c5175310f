"""DS-ResNet: ResNet-18/50 (and a CIFAR-style ResNet-20) with dynamic width.

Every stage's width is a ratio of the standard width (default 0.25, 0.5,
0.75, 1.0), rounded to multiples of 8. At ratio 1.0 every layer has the shape
of the standard torchvision ResNet, so the largest sub-network has its
parameters and MACs (plus the gate).

Default gate placement: between stage 2 and stage 3 (``gate_stage=3``; the
stem is stage 0), mirroring the official DS-MobileNetV1, whose gate sits in its
second-to-last stage. Stages before the gate run once per batch, shared by
every routed sub-network, so they run at one width (``pre_gate_ratio``, by
default the slimmest, as the official model does). That leaves ~56% of
ResNet-50's MACs after the gate, where they can be saved, while the gate sees
features from 2/3 of the network's downsampling, deep enough to tell easy
inputs from hard ones. The full-width network is kept as the training-only
largest sub-network (teacher of in-place bootstrapping).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.gate import DynamicGate, make_divisible
from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear, conv_bn
from dsnet.models.base import DynamicNet
from dsnet.models.registry import register_model
from dsnet.models.static import ChannelMatch, SplitAtGate, StaticLayers, StaticResidual, conv_bn_act, match_channels

__all__ = ["DSResNet", "ds_resnet18", "ds_resnet50", "ds_resnet20_cifar"]


class DSBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, num_slots: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = SlicedConv2d(in_channels, planes, 3, stride)
        self.bn1 = SlicedBatchNorm2d(planes, num_slots)
        self.conv2 = SlicedConv2d(planes, out, 3)
        self.bn2 = SlicedBatchNorm2d(out, num_slots)
        self.shortcut = _Shortcut(in_channels, out, stride, num_slots) if stride != 1 or in_channels != out else None
        self.crosses_gate = False  # set by DSResNet for the first routed block (see forward)

    def body(self, x: Tensor, planes: int, slot: int) -> Tensor:
        x = F.relu(conv_bn(self.conv1, self.bn1, x, slot, planes))
        return conv_bn(self.conv2, self.bn2, x, slot, planes * self.expansion)

    def static_body(self, in_width: int, planes: int, slot: int) -> nn.Sequential:
        out = planes * self.expansion
        return nn.Sequential(
            *conv_bn_act(self.conv1.to_static(in_width, planes), self.bn1.to_static(planes, slot), nn.ReLU()),
            *conv_bn_act(self.conv2.to_static(planes, out), self.bn2.to_static(out, slot), None),
        )

    def forward(self, x: Tensor, planes: int, slot: int) -> Tensor:
        out = planes * self.expansion
        if self.shortcut is not None:
            short = self.shortcut(x, out, slot)
        else:
            # an identity shortcut across the gate (the first routed block, when no projection is needed at full
            # width: gate_stage=1 in a basic-block ResNet) joins a pre-gate width to a routed one
            short = match_channels(x, out) if self.crosses_gate else x
        return F.relu(self.body(x, planes, slot) + short)

    def to_static(self, in_width: int, planes: int, slot: int) -> StaticResidual:
        out = planes * self.expansion
        if self.shortcut is not None:
            short: nn.Module = self.shortcut.to_static(in_width, out, slot)
        else:
            short = ChannelMatch(out) if self.crosses_gate and in_width != out else nn.Identity()
        return StaticResidual(self.static_body(in_width, planes, slot), short, nn.ReLU())


class DSBottleneck(DSBasicBlock):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, num_slots: int) -> None:
        nn.Module.__init__(self)
        out = planes * self.expansion
        self.conv1 = SlicedConv2d(in_channels, planes, 1)
        self.bn1 = SlicedBatchNorm2d(planes, num_slots)
        self.conv2 = SlicedConv2d(planes, planes, 3, stride)  # stride on the 3x3, as torchvision's v1.5
        self.bn2 = SlicedBatchNorm2d(planes, num_slots)
        self.conv3 = SlicedConv2d(planes, out, 1)
        self.bn3 = SlicedBatchNorm2d(out, num_slots)
        self.shortcut = _Shortcut(in_channels, out, stride, num_slots) if stride != 1 or in_channels != out else None
        self.crosses_gate = False

    def body(self, x: Tensor, planes: int, slot: int) -> Tensor:
        x = F.relu(conv_bn(self.conv1, self.bn1, x, slot, planes))
        x = F.relu(conv_bn(self.conv2, self.bn2, x, slot, planes))
        return conv_bn(self.conv3, self.bn3, x, slot, planes * self.expansion)

    def static_body(self, in_width: int, planes: int, slot: int) -> nn.Sequential:
        out = planes * self.expansion
        return nn.Sequential(
            *conv_bn_act(self.conv1.to_static(in_width, planes), self.bn1.to_static(planes, slot), nn.ReLU()),
            *conv_bn_act(self.conv2.to_static(planes, planes), self.bn2.to_static(planes, slot), nn.ReLU()),
            *conv_bn_act(self.conv3.to_static(planes, out), self.bn3.to_static(out, slot), None),
        )


class _Shortcut(nn.Module):
    """1x1 projection shortcut (conv + BN)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_slots: int) -> None:
        super().__init__()
        self.conv = SlicedConv2d(in_channels, out_channels, 1, stride, padding=0)
        self.bn = SlicedBatchNorm2d(out_channels, num_slots)

    def forward(self, x: Tensor, out_channels: int, slot: int) -> Tensor:
        return conv_bn(self.conv, self.bn, x, slot, out_channels)

    def to_static(self, in_width: int, out_width: int, slot: int) -> nn.Sequential:
        return conv_bn_act(self.conv.to_static(in_width, out_width), self.bn.to_static(out_width, slot), None)


class DSResNet(SplitAtGate, DynamicNet):
    """Dynamic slimmable ResNet.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage.
        planes: full-width planes per stage (bottleneck output is 4x).
        width_ratios: routed width choices as ratios of the full width.
        pre_gate_ratio: width ratio of the stages before the gate.
        gate_stage: first routed stage (the stem is stage 0).
        stem: ``"imagenet"`` (7x7/2 conv + max-pool) or ``"cifar"`` (3x3 conv).
        stem_stride: stride of the ``"cifar"`` stem (2 quarters the compute of small images).
        gate_se_ratio: width of the gate's shared encoder as a fraction of its input channels
            (0.25 as squeeze-excitation; narrow networks need more to tell easy inputs from hard ones).
        gate_mode: ``"exit"`` (decide after the slimmest ran; the default with two or more routing
            choices) or ``"pre"`` (the paper's gate); see :meth:`DynamicNet.set_gate_mode`.
        subnet_widths: an explicit list of sub-networks (per-stage widths, slimmest first) instead of
            ``width_ratios``/``pre_gate_ratio``; layer sizes still come from ``planes`` and ``stem_width``.
        router: ``"logits"`` (the paper's gate logits) or ``"utility"`` (per-choice P(correct); see
            :class:`DynamicNet`).
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        planes: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        pre_gate_ratio: float | None = None,
        gate_stage: int = 3,
        routing_space: Sequence[int] | None = None,
        stem: str = "imagenet",
        stem_stride: int = 1,
        input_size: int = 224,
        zero_init_residual: bool = True,
        gate_se_ratio: float = 0.25,
        gate_mode: str | None = None,
        subnet_widths: Sequence[Sequence[int]] | None = None,
        router: str = "logits",
    ) -> None:
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(layers) != len(planes):
            raise ValueError("layers and planes need one entry per stage")
        ratios = sorted(width_ratios)
        if not ratios or len(set(ratios)) != len(ratios) or not 0 < ratios[0] <= ratios[-1] <= 1:
            raise ValueError(f"width_ratios must be distinct numbers in (0, 1], got {list(width_ratios)}")
        pre = ratios[0] if pre_gate_ratio is None else pre_gate_ratio
        if not 0 < pre <= 1:
            raise ValueError(f"pre_gate_ratio must be in (0, 1], got {pre_gate_ratio}")
        if min(layers, default=0) < 1 or min(planes, default=0) < 1 or stem_width < 1:
            raise ValueError(
                f"layers, planes and stem_width must be positive, got {list(layers)}, {list(planes)}, {stem_width}"
            )
        if gate_se_ratio <= 0:
            raise ValueError(f"gate_se_ratio must be positive, got {gate_se_ratio}")

        def widths(base: int, stage: int) -> tuple[int, ...]:
            chosen = [pre, 1.0] if stage < gate_stage else ratios
            return tuple(sorted({make_divisible(base * r, 8) for r in chosen}))

        full = [stem_width, *planes]
        stage_names = ("stem",) + tuple(f"layer{i + 1}" for i in range(len(layers)))
        stage_widths = [widths(base, s) for s, base in enumerate(full)]
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
        block_cls = DSBottleneck if block == "bottleneck" else DSBasicBlock
        slots = self.num_slots
        self.stem_kind = stem
        if stem == "imagenet":
            self.stem = SlicedConv2d(in_chans, stem_width, 7, 2, padding=3)
        else:
            self.stem = SlicedConv2d(in_chans, stem_width, 3, stem_stride)
        self.stem_bn = SlicedBatchNorm2d(stem_width, slots)
        self.blocks = nn.ModuleList()
        self._block_stage: list[int] = []
        in_ch = stem_width
        for s, (depth, p) in enumerate(zip(layers, planes), start=1):
            for b in range(depth):
                stride = 2 if (b == 0 and s > 1) else 1
                self.blocks.append(block_cls(in_ch, p, stride, slots))
                self._block_stage.append(s)
                in_ch = p * block_cls.expansion
        self.expansion = block_cls.expansion
        if subnet_widths is not None:
            self._check_identity_shortcuts()
        self.gate_block = self._block_stage.index(gate_stage)
        self.blocks[self.gate_block].crosses_gate = True
        gate_channels = stem_width if gate_stage == 1 else planes[gate_stage - 2] * block_cls.expansion
        self._gate = DynamicGate(gate_channels, len(self.routing_space), gate_se_ratio)
        self.set_gate_mode(gate_mode)
        self.classifier = SlicedLinear(in_ch, num_classes)
        if zero_init_residual:  # each residual branch starts as identity, as timm does
            for blk in self.blocks:
                last_bn = blk.bn3 if isinstance(blk, DSBottleneck) else blk.bn2
                nn.init.zeros_(last_bn.weight)

    @property
    def gate(self) -> DynamicGate:  # type: ignore[override]
        return self._gate

    def _check_identity_shortcuts(self) -> None:
        """An identity shortcut across stages adds the previous stage's features: both need one width."""
        for i, blk in enumerate(self.blocks):
            s = self._block_stage[i]
            prev = s - 1 if i == 0 or self._block_stage[i - 1] != s else s
            if blk.shortcut is not None or prev == s:
                continue
            for net in self.subnets:
                if self._out_width(net.index, prev) != self._out_width(net.index, s):
                    raise ValueError(
                        f"subnet_widths[{net.index}]: stages {net.stage_names[prev]} and {net.stage_names[s]} are "
                        f"joined by an identity shortcut and need the same width, got {net.widths}"
                    )

    def _stem(self, x: Tensor, width: int, slot: int) -> Tensor:
        x = F.relu(conv_bn(self.stem, self.stem_bn, x, slot, width))
        return F.max_pool2d(x, 3, 2, 1) if self.stem_kind == "imagenet" else x

    def _run_blocks(self, x: Tensor, subnet: int, start: int, stop: int) -> Tensor:
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        for i in range(start, stop):
            s = self._block_stage[i]
            x = self.blocks[i](x, widths[s], slots[s])
        return x

    def forward_pre(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        x = self._run_blocks(self._stem(x, widths[0], slots[0]), subnet, 0, self.gate_block)
        return self.forward_gate(x, subnet)

    def forward_post(self, h: Tensor, subnet: int) -> Tensor:
        x = self._run_blocks(h, subnet, self.gate_block, len(self.blocks))
        return self.classifier(x.mean((2, 3)))

    def _out_width(self, subnet: int, stage: int) -> int:
        w = self.subnets[subnet].widths[stage]
        return w if stage == 0 else w * self.expansion

    def _static_layers(self, subnet: int, part: str = "all") -> StaticLayers:
        """Plain layers of sub-network ``subnet``: (before the gate, the gate's attention, after it); ``part``
        ("trunk", "post" or "all") says which are built (the others come back empty / None)."""
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        trunk: list[nn.Module] = []
        post: list[nn.Module] = []
        if part != "post":
            trunk.append(self._static_stem(subnet, nn.ReLU()))
            if self.stem_kind == "imagenet":
                trunk.append(nn.MaxPool2d(3, 2, 1))
        gate = None
        in_width = widths[0]
        for i, blk in enumerate(self.blocks):
            s = self._block_stage[i]
            if i == self.gate_block and part == "all":
                gate = self._gate.to_static(in_width)
            layers = trunk if i < self.gate_block else post
            if layers is trunk and part != "post" or layers is post and part != "trunk":
                layers.append(blk.to_static(in_width, widths[s], slots[s]))
            in_width = self._out_width(subnet, s)
        if part != "trunk":
            post += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), self.classifier.to_static(in_width)]
        return trunk, gate, post


@register_model(input_size=224)
def ds_resnet50(**kwargs) -> DSResNet:
    """ResNet-50 (bottleneck, 3-4-6-3); full width = torchvision ResNet-50 shapes."""
    return DSResNet(block="bottleneck", layers=(3, 4, 6, 3), **kwargs)


@register_model(input_size=224)
def ds_resnet18(**kwargs) -> DSResNet:
    """ResNet-18 (basic blocks, 2-2-2-2); full width = torchvision ResNet-18 shapes."""
    return DSResNet(block="basic", layers=(2, 2, 2, 2), **kwargs)


@register_model(input_size=32)
def ds_resnet20_cifar(**kwargs) -> DSResNet:
    """CIFAR-style ResNet-20 (3x3 stem, 3 stages of 3 basic blocks, 32-64-128 planes) for 28-32 px."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_size", 32)
    kwargs.setdefault("gate_stage", 2)
    kwargs.setdefault("pre_gate_ratio", 0.5)
    return DSResNet(block="basic", layers=(3, 3, 3), planes=(32, 64, 128), stem_width=32, stem="cifar", **kwargs)


@register_model(input_size=28)
def ds_resnet8_tiny(**kwargs) -> DSResNet:
    """ResNet-8 (stride-2 3x3 stem, 3 stages of 1 basic block, 32-64-128 planes) for 28-32 px; trains in minutes."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_size", 28)
    kwargs.setdefault("gate_stage", 2)
    kwargs.setdefault("pre_gate_ratio", 0.5)
    kwargs.setdefault("stem_stride", 2)
    # its gate sees 16-32 channels: a squeeze-excitation width of 0.25 (4-8 dims) cannot tell easy
    # inputs from hard ones (measured on Fashion-MNIST: gate no better than random routing), the full width can
    kwargs.setdefault("gate_se_ratio", 1.0)
    # a model meant for minutes of training: residual branches that start at zero (timm's long-schedule default)
    # cost 1.1-1.6 points on held-out Fashion-MNIST images after 3 epochs (scripts/supernet_ablation.py)
    kwargs.setdefault("zero_init_residual", False)
    return DSResNet(block="basic", layers=(1, 1, 1), planes=(32, 64, 128), stem_width=32, stem="cifar", **kwargs)
