"""LC-Net: per-input layer (block) skipping and channel skipping with learned scales (SPEC 6.1).

The LC-Net paper (Xia et al. 2020, "Fully Dynamic Inference with Deep Neural
Networks") has no public code; this is the SPEC's reconstruction from the
closest public designs, every choice tagged [ours] below.

Per residual block, both predictors read the block *input* ``x``, so every
decision is known before the block is computed:

* **L-Net** (ConvNet-AIG's gate): ``GAP(x) -> FC(C->16) -> BN -> ReLU ->
  FC(16->2)`` gives (skip, execute) logits; training draws a hard
  straight-through Gumbel-softmax sample (tau=1), so ``g in {0, 1}`` forward
  and soft gradients backward. The block computes ``ReLU(x + g * s * F(x))``.
  [ours] The learned scale is per input: ``s = 1 + tanh(FC(16->1))`` on the
  gate's hidden features (in (0, 2), starting at 1). Initial execute bias as
  ConvNet-AIG's (logits 0.1 / 2.0: blocks start mostly executed).
* **C-Net** (FBS's saliency): ``a = ReLU(FC(GAP(|x|)))`` over the block's
  inner channels (``planes``); the top ``k = round(density * planes)`` are kept
  and multiplied by their saliency ("boosting"), the rest are zero. [ours] One
  saliency vector per block is shared by every inner activation of the block
  (basic block: after conv1; bottleneck: after conv1 and after conv2, scaled
  both times), as DS-Net uses one width per block; the density is fixed (as
  FBS), so the C-Net decides *which* channels, not how many.
* **Blocks that cannot be skipped** [ours, as ConvNet-AIG does for
  downsampling]: a block with a projection shortcut (stride or width change)
  has no identity path to fall back on, so it has no L-Net and always runs;
  its C-Net still selects channels.
* **Thresholds** [ours]: training samples decisions (Gumbel); inference
  takes them deterministically, ``execute = margin > threshold`` with the
  margin = execute logit - skip logit. After a short run the gates are not
  yet polarised (``p(execute)`` near the target rate for every input), and a
  plain argmax (threshold 0) would execute nearly every block. Each L-Net
  therefore stores a threshold, calibrated on held-out images after training
  so that inference executes the block as often as the sampled gate does in
  expectation (``dsnet.train.lcnet.calibrate_thresholds``), the
  most-confident inputs first. ``skip_bias`` shifts all thresholds at run time.
* A skipped block's output is its input: the input of every block is a ReLU
  output (non-negative), so ``ReLU(x + 0) = x`` exactly.

Inference (eval mode) really skips: per block, the samples whose gate says
execute are gathered, the block is computed for them only, and the results
are put back (skipped samples keep their input, bit for bit). Kept channels
are computed as per-sample subsets (``channel_mode="gather"``, see
:mod:`dsnet.layers.channel_subset`), or, for cost comparisons, as the same
number of prefix channels (``"prefix"``: a different function, cost reference
only) or at full width with the dropped channels zeroed (``"mask"``: the same
output as ``"gather"``, the cost of a masking implementation).

``extract()`` is not defined: an arbitrary per-input set of blocks and
channels has no single static network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dsnet.layers.channel_subset import ChannelSubsetConvBN, topk_channels
from dsnet.layers.gate import straight_through_gumbel
from dsnet.models.base import check_input_dtype
from dsnet.models.registry import register_model
from dsnet.utils.modes import temporary_mode

__all__ = [
    "CHANNEL_MODES",
    "LCResult",
    "LCMacs",
    "LNet",
    "CNet",
    "LCResNet",
    "lc_resnet8_tiny",
    "lc_resnet20_cifar",
    "lc_resnet50",
]

CHANNEL_MODES = ("gather", "prefix", "mask")
_EXECUTE = 1  # index of the "execute" logit of an L-Net (0 = skip)


@dataclass
class LCResult:
    """The output of an LC-Net and the per-sample decisions that produced it.

    Per block ``b`` of ``model.blocks``; blocks that cannot be skipped have
    ``execute = 1``, ``scale = 1`` and ``gate_margin = +inf``.
    """

    logits: Tensor  # (N, num_classes)
    execute: Tensor  # (N, B) 1.0 where block b ran for sample n (training: straight-through gates, differentiable)
    scale: Tensor  # (N, B) learned scale s of the residual branch
    gate_margin: Tensor  # (N, B) execute logit minus skip logit (runs where margin > threshold + skip_bias)
    saliency: list[Tensor]  # per block (N, planes_b): C-Net saliency (training: differentiable)
    channels: list[Tensor]  # per block (N, k_b): kept channel indices, ascending


@dataclass(frozen=True)
class LCMacs:
    """Multiply-adds per sample of an LC-Net at one input size and density.

    A sample costs ``fixed + sum_b execute[b] * body[b]``. ``fixed`` covers the
    stem, the classifier, every predictor (L-Net and C-Net run for every
    sample) and the blocks that cannot be skipped; ``body[b]`` is block ``b``'s
    residual branch at its kept channel count (0 for unskippable blocks,
    counted in ``fixed``). ``dense`` is the plain ResNet: every block, every
    channel, no predictors.
    """

    fixed: int
    body: tuple[int, ...]
    predictors: int
    dense: int

    def per_sample(self, execute: Tensor) -> Tensor:
        """Per-sample MACs (int64) of an ``(N, B)`` execute matrix."""
        body = torch.tensor(self.body, dtype=torch.int64, device=execute.device)
        runs = execute.detach() if execute.dtype == torch.bool else execute.detach().round()
        return self.fixed + (runs.to(torch.int64) * body).sum(1)

    def expected(self, execute: Tensor) -> Tensor:
        """Per-sample MACs as a differentiable function of (straight-through) execute gates."""
        body = torch.tensor(self.body, dtype=execute.dtype, device=execute.device)
        return self.fixed + execute @ body

    @property
    def all_executed(self) -> int:
        return self.fixed + sum(self.body)


class LNet(nn.Module):
    """ConvNet-AIG gate ``GAP -> FC(C->16) -> BN -> ReLU -> FC(16->2)`` with a scale head ``1 + tanh(FC(16->1))``."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, bias=False)  # BN follows: a bias would be redundant
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)
        self.scale_head = nn.Linear(hidden, 1)
        # inference executes where margin (execute - skip logit) > threshold; set after training so that argmax
        # decisions run the block as often as the trained (sampled) gate does, see dsnet.train.lcnet
        self.register_buffer("threshold", torch.zeros(()))
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([0.1, 2.0]))  # ConvNet-AIG's initial bias: execute favoured
            self.scale_head.weight.zero_()  # s = 1 at the start
            self.scale_head.bias.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(skip, execute) logits ``(N, 2)`` and the scale ``(N,)``."""
        z = F.relu(self.bn(self.fc1(x.mean((2, 3)))))
        return self.fc2(z), 1.0 + torch.tanh(self.scale_head(z)).squeeze(1)


class CNet(nn.Module):
    """FBS channel saliency ``a = ReLU(FC(GAP(|x|)))`` over ``channels`` inner channels."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, channels)
        with torch.no_grad():
            # [ours] saliencies start near 1 (the block starts as a plain block on a random channel subset)
            nn.init.normal_(self.fc.weight, std=0.01)
            self.fc.bias.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x.abs().mean((2, 3))))


def keep_count(density: float, planes: int) -> int:
    """Channels kept at ``density``: ``round(density * planes)``, at least one."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(planes, int(round(density * planes))))


class LCBasicBlock(nn.Module):
    """Basic residual block (two 3x3 convs) with a C-Net, and an L-Net when it has an identity shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.planes = planes
        self.conv1 = ChannelSubsetConvBN(in_channels, planes, 3, stride)
        self.conv2 = ChannelSubsetConvBN(planes, out, 3)
        self._init_common(in_channels, out, stride)

    def _init_common(self, in_channels: int, out: int, stride: int) -> None:
        self.out_channels = out
        self.cnet = CNet(in_channels, self.planes)
        projection = stride != 1 or in_channels != out
        self.shortcut = ChannelSubsetConvBN(in_channels, out, 1, stride) if projection else None
        self.lnet = None if projection else LNet(in_channels)
        nn.init.zeros_(self.last_bn.weight)  # each residual branch starts as identity, as timm does

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.conv2.bn

    @property
    def skippable(self) -> bool:
        return self.lnet is not None

    # ------------------------------------------------------------- residual branch, three ways
    def body_masked(self, x: Tensor, m: Tensor) -> Tensor:
        """Full width, inner channels multiplied by ``m`` (saliency on kept channels, 0 elsewhere)."""
        return self.conv2(F.relu(self.conv1(x)) * m[:, :, None, None])

    def body_gather(self, x: Tensor, index: Tensor, value: Tensor) -> Tensor:
        """Only the kept channels ``index`` (per sample) are computed."""
        h = F.relu(self.conv1.gather(x, out_index=index)) * value[:, :, None, None]
        return self.conv2.gather(h, in_index=index)

    def body_prefix(self, x: Tensor, value: Tensor) -> Tensor:
        """Cost reference: the first ``k`` channels instead of the salient ones (a different function)."""
        h = F.relu(self.conv1.prefix(x, value.shape[1])) * value[:, :, None, None]
        return self.conv2.prefix(h, self.out_channels)

    # ------------------------------------------------------------- whole block
    def forward_train(self, x: Tensor, keep: int, tau: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Differentiable: dense compute, channel mask, straight-through gate (used in training mode)."""
        n = x.shape[0]
        saliency = self.cnet(x)
        index, value = topk_channels(saliency, keep)
        mask = torch.zeros_like(saliency).scatter(1, index, value)  # gradient reaches the kept saliencies
        y = self.body_masked(x, mask)
        short = x if self.shortcut is None else self.shortcut(x)
        if self.lnet is None:
            ones = x.new_ones(n)
            return F.relu(short + y), _decision(ones, ones, torch.full_like(ones, math.inf), saliency, index)
        logits, scale = self.lnet(x)
        g = straight_through_gumbel(logits, tau)[:, _EXECUTE]
        out = F.relu(short + y * (g * scale)[:, None, None, None])
        return out, _decision(g, scale, logits[:, _EXECUTE] - logits[:, 1 - _EXECUTE], saliency, index)

    def forward_infer(
        self, x: Tensor, keep: int, mode: str, skip_bias: float, execute: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Eval: the block runs only for the samples whose gate says execute, on their kept channels."""
        n = x.shape[0]
        saliency = self.cnet(x)
        index, value = topk_channels(saliency, keep)
        if self.lnet is None:
            run = torch.ones(n, dtype=torch.bool, device=x.device)
            scale = x.new_ones(n)
            margin = torch.full_like(scale, math.inf)
        else:
            logits, scale = self.lnet(x)
            margin = logits[:, _EXECUTE] - logits[:, 1 - _EXECUTE]
            run = margin > self.lnet.threshold + skip_bias if execute is None else execute.to(torch.bool)
        decision = _decision(run.to(x.dtype), scale, margin, saliency, index)
        rows = None if bool(run.all()) else run.nonzero().squeeze(1)
        if rows is not None and rows.numel() == 0:
            return x, decision  # every sample skips: nothing is computed
        xe, index_e, value_e, scale_e = x, index, value, scale
        if rows is not None:
            xe, index_e, value_e, scale_e = (t.index_select(0, rows) for t in (x, index, value, scale))
        if mode == "gather":
            y = self.body_gather(xe, index_e, value_e)
        elif mode == "prefix":
            y = self.body_prefix(xe, value_e)
        else:  # mask
            y = self.body_masked(xe, torch.zeros_like(saliency[: xe.shape[0]]).scatter(1, index_e, value_e))
        short = xe if self.shortcut is None else self.shortcut(xe)
        if self.lnet is not None:
            y = y * scale_e[:, None, None, None]
        ye = F.relu(short + y)
        if rows is None:
            return ye, decision
        return x.index_copy(0, rows, ye), decision  # skipped samples keep their input

    def predictor_macs_probe(self, x: Tensor) -> None:
        """Run the predictors alone (for MAC counting)."""
        self.cnet(x)
        if self.lnet is not None:
            self.lnet(x)


class LCBottleneck(LCBasicBlock):
    """Bottleneck (1x1, 3x3, 1x1; stride on the 3x3, as torchvision's v1.5); one channel set for both inner layers."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        nn.Module.__init__(self)
        out = planes * self.expansion
        self.planes = planes
        self.conv1 = ChannelSubsetConvBN(in_channels, planes, 1)
        self.conv2 = ChannelSubsetConvBN(planes, planes, 3, stride)
        self.conv3 = ChannelSubsetConvBN(planes, out, 1)
        self._init_common(in_channels, out, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.conv3.bn

    def body_masked(self, x: Tensor, m: Tensor) -> Tensor:
        m = m[:, :, None, None]
        h = F.relu(self.conv1(x)) * m
        return self.conv3(F.relu(self.conv2(h)) * m)

    def body_gather(self, x: Tensor, index: Tensor, value: Tensor) -> Tensor:
        v = value[:, :, None, None]
        h = F.relu(self.conv1.gather(x, out_index=index)) * v
        h = F.relu(self.conv2.gather(h, out_index=index, in_index=index)) * v
        return self.conv3.gather(h, in_index=index)

    def body_prefix(self, x: Tensor, value: Tensor) -> Tensor:
        k, v = value.shape[1], value[:, :, None, None]
        h = F.relu(self.conv1.prefix(x, k)) * v
        h = F.relu(self.conv2.prefix(h, k)) * v
        return self.conv3.prefix(h, self.out_channels)


def _decision(execute: Tensor, scale: Tensor, margin: Tensor, saliency: Tensor, index: Tensor) -> dict[str, Tensor]:
    return {"execute": execute, "scale": scale, "margin": margin, "saliency": saliency, "channels": index}


class LCResNet(nn.Module):
    """ResNet with LC-Net predictors in every residual block.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage.
        planes: inner channels per stage (bottleneck output is 4x).
        density: fraction of each block's inner channels the C-Net keeps (FBS's ``d``).
        stem: ``"imagenet"`` (7x7/2 conv + max-pool) or ``"cifar"`` (3x3 conv, ``stem_stride``).

    Call ``model(x)`` for the logits, ``model(x, return_decisions=True)`` for
    an :class:`LCResult`. Eval-mode keyword arguments (run-time knobs, no
    retraining): ``skip_bias`` (a block runs where its execute-minus-skip
    logit exceeds its stored threshold plus ``skip_bias``: > 0 skips more), ``density`` (overrides the trained
    density), ``channel_mode`` (``"gather"``, ``"prefix"``, ``"mask"``, see the
    module docstring), ``execute`` (an ``(N, B)`` boolean matrix forcing the
    skip decisions; the L-Nets still run, so their cost is paid).
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        planes: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        density: float = 0.5,
        stem: str = "imagenet",
        stem_stride: int = 1,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(layers) != len(planes):
            raise ValueError("layers and planes need one entry per stage")
        keep_count(density, 1)  # validates the range
        self.density = float(density)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.default_input_size = (in_chans, input_size, input_size)
        self.stem_kind = stem
        if stem == "imagenet":
            self.stem = ChannelSubsetConvBN(in_chans, stem_width, 7, 2)
        else:
            self.stem = ChannelSubsetConvBN(in_chans, stem_width, 3, stem_stride)
        block_cls = LCBottleneck if block == "bottleneck" else LCBasicBlock
        blocks: list[LCBasicBlock] = []
        in_ch = stem_width
        for s, (depth, p) in enumerate(zip(layers, planes)):
            for b in range(depth):
                stride = 2 if (b == 0 and s > 0) else 1
                blocks.append(block_cls(in_ch, p, stride))
                in_ch = p * block_cls.expansion
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(in_ch, num_classes)
        self._macs_cache: dict[tuple, LCMacs] = {}

    # ------------------------------------------------------------------ properties
    @property
    def skippable(self) -> list[bool]:
        """Per block: whether it has an L-Net (identity shortcut) and can be skipped."""
        return [blk.skippable for blk in self.blocks]

    def keep_counts(self, density: float | None = None) -> list[int]:
        """Kept inner channels per block at ``density`` (default: the model's)."""
        d = self.density if density is None else density
        return [keep_count(d, blk.planes) for blk in self.blocks]

    def extract(self, *args, **kwargs) -> nn.Module:
        raise ValueError(
            "an LC-Net has no static sub-networks to extract: each input runs its own subset of blocks and an "
            "arbitrary subset of channels in each, so no single static network computes it"
        )

    # ------------------------------------------------------------------ forward
    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a batch of images shaped (N, {self.in_chans}, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {x.dtype}")
        check_input_dtype(self, x)

    def _stem(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        return F.max_pool2d(x, 3, 2, 1) if self.stem_kind == "imagenet" else x

    def forward(
        self,
        x: Tensor,
        *,
        return_decisions: bool = False,
        skip_bias: float = 0.0,
        density: float | None = None,
        channel_mode: str = "gather",
        execute: Tensor | None = None,
        tau: float = 1.0,
    ) -> Tensor | LCResult:
        self.check_input(x)
        if self.training:
            if skip_bias != 0.0 or density is not None or channel_mode != "gather" or execute is not None:
                raise ValueError("skip_bias, density, channel_mode and execute are inference options (eval mode)")
        else:
            if channel_mode not in CHANNEL_MODES:
                raise ValueError(f"channel_mode must be one of {', '.join(CHANNEL_MODES)}, got {channel_mode!r}")
            if execute is not None:
                execute = self._check_execute(execute, x.shape[0])
        if not self.training and not math.isfinite(float(skip_bias)):
            raise ValueError(f"skip_bias must be finite, got {skip_bias} (nan/inf would run or skip every block)")
        if x.shape[0] == 0:
            return self._empty(x, return_decisions, skip_bias, density, channel_mode)
        keeps = self.keep_counts(density)
        h = self._stem(x)
        decisions = []
        for b, blk in enumerate(self.blocks):
            if self.training:
                h, d = blk.forward_train(h, keeps[b], tau)
            else:
                forced = None if execute is None else execute[:, b]
                h, d = blk.forward_infer(h, keeps[b], channel_mode, skip_bias, forced)
            decisions.append(d)
        logits = self.classifier(h.mean((2, 3)))
        if not return_decisions:
            return logits
        return LCResult(
            logits=logits,
            execute=torch.stack([d["execute"] for d in decisions], 1),
            scale=torch.stack([d["scale"] for d in decisions], 1),
            gate_margin=torch.stack([d["margin"] for d in decisions], 1),
            saliency=[d["saliency"] for d in decisions],
            channels=[d["channels"] for d in decisions],
        )

    def _empty(
        self, x: Tensor, return_decisions: bool, skip_bias: float, density: float | None, channel_mode: str
    ) -> Tensor | LCResult:
        """An empty batch's answer: empty logits (and decisions), shaped as a batch of one's."""
        if self.training:
            raise ValueError("an empty batch cannot train an LC-Net (batch norm needs samples)")
        with torch.no_grad():
            one = self.forward(
                x.new_zeros(1, *x.shape[1:]),
                return_decisions=return_decisions,
                skip_bias=skip_bias,
                density=density,
                channel_mode=channel_mode,
            )
        if not return_decisions:
            return one[:0]
        return LCResult(
            logits=one.logits[:0],
            execute=one.execute[:0],
            scale=one.scale[:0],
            gate_margin=one.gate_margin[:0],
            saliency=[t[:0] for t in one.saliency],
            channels=[t[:0] for t in one.channels],
        )

    def _check_execute(self, execute: Tensor, n: int) -> Tensor:
        if execute.shape != (n, len(self.blocks)):
            raise ValueError(
                f"execute must be shaped (N, blocks) = ({n}, {len(self.blocks)}), got {tuple(execute.shape)}"
            )
        execute = execute.to(torch.bool)
        fixed = [b for b, s in enumerate(self.skippable) if not s]
        if fixed and not bool(execute[:, fixed].all()):
            raise ValueError(
                f"blocks {fixed} have projection shortcuts and cannot be skipped: execute must be True there"
            )
        return execute

    # ------------------------------------------------------------------ MACs
    def macs_table(self, input_size: Sequence[int] | None = None, density: float | None = None) -> LCMacs:
        """Per-block MAC costs at ``input_size`` (C, H, W) and ``density``, counted with FlopCounterMode.

        One probe image runs through the real inference path piece by piece
        (stem, each block's predictors, each block's gathered residual branch,
        classifier), each piece under its own counter.
        """
        size = tuple(input_size or self.default_input_size)
        keeps = tuple(self.keep_counts(density))
        key = (size, keeps)
        if key not in self._macs_cache:
            self._macs_cache[key] = self._count_table(size, keeps)
        return self._macs_cache[key]

    def _count_table(self, size: tuple[int, ...], keeps: tuple[int, ...]) -> LCMacs:
        param = next(self.parameters())
        x = torch.zeros(1, *size, device=param.device, dtype=param.dtype)
        with temporary_mode(self, False), torch.no_grad():
            fixed, h = _macs(lambda: self._stem(x))
            dense = fixed
            predictors = 0
            body: list[int] = []
            run_one = torch.ones(1, dtype=torch.bool, device=x.device)
            for blk, k in zip(self.blocks, keeps):
                pred, _ = _macs(lambda blk=blk, h=h: blk.predictor_macs_probe(h))
                full, out = _macs(lambda blk=blk, h=h, k=k: blk.forward_infer(h, k, "gather", 0.0, run_one)[0])
                branch = full - pred
                full_width, _ = _macs(lambda blk=blk, h=h: blk.forward_infer(h, blk.planes, "gather", 0.0, run_one)[0])
                dense += full_width - pred
                predictors += pred
                fixed += pred
                if blk.skippable:
                    body.append(branch)
                else:
                    body.append(0)
                    fixed += branch
                h = out
            head, _ = _macs(lambda: self.classifier(h.mean((2, 3))))
        return LCMacs(fixed=fixed + head, body=tuple(body), predictors=predictors, dense=dense + head)

    def per_sample_macs(
        self, execute: Tensor, input_size: Sequence[int] | None = None, density: float | None = None
    ) -> Tensor:
        """Per-sample MACs (int64) of an ``(N, B)`` execute matrix (e.g. ``LCResult.execute``)."""
        return self.macs_table(input_size, density).per_sample(execute)

    def count_macs(self, x: Tensor, **options) -> Tensor:
        """Per-sample MACs of inference on the batch ``x`` (eval, gather mode; ``options`` as ``forward``'s)."""
        with temporary_mode(self, False), torch.inference_mode():
            result = self(x, return_decisions=True, **options)
        return self.per_sample_macs(result.execute, tuple(x.shape[1:]), options.get("density"))

    def extra_repr(self) -> str:
        skip = sum(self.skippable)
        return f"blocks={len(self.blocks)}, skippable={skip}, density={self.density}"


def _macs(fn) -> tuple[int, object]:  # noqa: ANN001
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return int(counter.get_total_flops() // 2), out


@register_model(input_size=224, kind="lcnet")
def lc_resnet50(**kwargs) -> LCResNet:
    """LC-Net ResNet-50 (bottleneck, 3-4-6-3; torchvision ResNet-50 shapes) with an L-Net and a C-Net per block."""
    return LCResNet(block="bottleneck", layers=(3, 4, 6, 3), **kwargs)


@register_model(input_size=32, kind="lcnet")
def lc_resnet20_cifar(**kwargs) -> LCResNet:
    """LC-Net ResNet-20 (3x3 stem, 3 stages of 3 basic blocks, 32-64-128 planes: ds_resnet20_cifar's full width)."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_size", 32)
    return LCResNet(block="basic", layers=(3, 3, 3), planes=(32, 64, 128), stem_width=32, stem="cifar", **kwargs)


@register_model(input_size=28, kind="lcnet")
def lc_resnet8_tiny(**kwargs) -> LCResNet:
    """LC-Net ResNet-8 (stride-2 3x3 stem, 1 basic block per stage, 32-64-128 planes: ds_resnet8_tiny's full width)."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_size", 28)
    kwargs.setdefault("stem_stride", 2)
    return LCResNet(block="basic", layers=(1, 1, 1), planes=(32, 64, 128), stem_width=32, stem="cifar", **kwargs)
