"""What every dynamic supernet shares: sub-networks, routing, extraction, MACs.

A model family describes its widths as one list of channel counts per stage
(index-aligned, SPEC section 1) and implements two halves of its forward pass:

* ``forward_pre(x, k)``: everything up to and including the gate's attention
  head, at the pre-gate widths of sub-network ``k``. Returns the feature map
  ``h`` and the gate encoding ``z``.
* ``forward_post(h, k)``: everything after the gate, at sub-network ``k``.

Every routed sub-network shares the pre-gate widths, so dynamic inference runs
``forward_pre`` once for the whole batch, lets the gate pick a sub-network per
sample, and runs ``forward_post`` once per group of samples that picked the
same one (SPEC section 4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from dsnet.layers.gate import (
    GATE_MODES,
    ROUTERS,
    DynamicGate,
    ExitHead,
    bias_ramp,
    cost_direction,
    routing_scores,
    straight_through_gumbel,
)
from dsnet.layers.sliced import (
    CacheBudget,
    SlicedBatchNorm2d,
    TensorCache,
    clear_caches,
    stored_channels_last,
    version_stamp,
)
from dsnet.models.static import fold_batchnorms, inplace_inference

_T = TypeVar("_T")
DEFAULT_GATE_MODE = "exit"  # what gate_mode=None builds when there are two or more routing choices
EXIT_HEAD_PREFIX = "exit_head."  # state-dict keys of the early-exit routing head (DynamicNet.set_gate_mode)

__all__ = ["Subnet", "RoutingResult", "DynamicNet", "build_subnets", "explicit_subnets", "check_input_dtype"]


@dataclass(frozen=True)
class Subnet:
    """One sub-network: a width (channel count) per stage, and a kernel size per stage where the family slices kernels.

    ``kernels`` is None for families without a kernel dimension (their
    sub-networks are their widths); a family with kernel slicing gives one
    kernel size per stage (the centre crop its sliceable convolutions use there;
    stages without a kernel choice name their fixed size).
    """

    index: int
    widths: tuple[int, ...]
    stage_names: tuple[str, ...]
    routed: bool  # False for the training-only largest network
    kernels: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.stage_names, self.widths))

    def kernel_dict(self) -> dict[str, int] | None:
        """Kernel size per stage, or None when the family slices no kernels."""
        return None if self.kernels is None else dict(zip(self.stage_names, self.kernels))

    def __str__(self) -> str:
        if self.kernels is None:
            stages = " ".join(f"{n}={w}" for n, w in zip(self.stage_names, self.widths))
        else:
            stages = " ".join(f"{n}={w}/{k}x{k}" for n, w, k in zip(self.stage_names, self.widths, self.kernels))
        return f"#{self.index} {stages}{'' if self.routed else ' (training only)'}"


@dataclass
class RoutingResult:
    """The output of dynamic inference and the decisions that produced it."""

    logits: Tensor  # (N, num_classes)
    subnet: Tensor  # (N,) index into ``model.subnets`` each sample was routed to
    choice: Tensor  # (N,) index into ``model.routing_space``
    gate_logits: Tensor  # (N, len(routing_space)), bias included
    gate_onehot: Tensor | None = field(default=None)  # straight-through one-hot (training only)


def build_subnets(stage_names: Sequence[str], stage_widths: Sequence[Sequence[int]], gate_stage: int) -> list[Subnet]:
    """Index-aligned sub-networks from per-stage width lists.

    Stages from ``gate_stage`` on are routed: each has ``n`` choices and routed
    sub-network ``i`` uses the ``i``-th of every one. Stages before the gate run
    once for the whole batch, so every routed sub-network uses their first
    (slimmest) width. If any stage offers a wider choice than the routed
    sub-networks use, the widest of everything is appended as a training-only
    sub-network (the official DS-MobileNetV1's "largest").
    """
    if len(stage_names) != len(stage_widths):
        raise ValueError("one width list per stage is needed")
    if not 0 < gate_stage < len(stage_widths):
        raise ValueError(f"gate_stage must name a stage after the first, got {gate_stage}")
    for name, widths in zip(stage_names, stage_widths):
        if not widths or list(widths) != sorted(set(widths)):
            raise ValueError(f"stage {name!r}: widths must be distinct and increasing, got {list(widths)}")
        if widths[0] < 1:
            raise ValueError(f"stage {name!r}: widths must be positive, got {list(widths)}")
    n = len(stage_widths[gate_stage])
    for name, widths in zip(stage_names[gate_stage:], stage_widths[gate_stage:]):
        if len(widths) != n:
            raise ValueError(f"routed stage {name!r} has {len(widths)} width choices, expected {n}")
    names = tuple(stage_names)
    subnets = []
    for i in range(n):
        widths = tuple(w[0] for w in stage_widths[:gate_stage]) + tuple(w[i] for w in stage_widths[gate_stage:])
        subnets.append(Subnet(i, widths, names, routed=True))
    largest = tuple(w[-1] for w in stage_widths)
    if largest != subnets[-1].widths:
        subnets.append(Subnet(n, largest, names, routed=False))
    return subnets


def explicit_subnets(
    stage_names: Sequence[str],
    subnet_widths: Sequence[Sequence[int]],
    gate_stage: int,
    full_widths: Sequence[int],
    subnet_kernels: Sequence[Sequence[int]] | None = None,
    stage_kernel_choices: Sequence[Sequence[int]] | None = None,
) -> list[Subnet]:
    """Sub-networks from an explicit list of per-stage widths (non-uniform sets: US-Nets grids, searched sets).

    The list is slimmest first and widest last: the last entry must be at least
    as wide as every other in every stage (it is the sandwich rule's largest and
    the in-place distillation teacher), the first at most as wide (its smallest).
    Every entry is routed, so all must agree on the stages before the gate
    (dynamic inference runs them once for the whole batch). No training-only
    largest is appended: channels beyond the widest entry are simply never used.

    ``subnet_kernels`` (families with kernel slicing): one kernel size per
    stage for each entry, each among that stage's ``stage_kernel_choices``.
    Then a sub-network is its widths *and* kernels: entries must differ in one
    or the other, agree on both before the gate, and the last must also have
    the largest kernel of every stage, the first the smallest.
    """
    if subnet_kernels is not None:
        return _explicit_kernel_subnets(
            stage_names, subnet_widths, gate_stage, full_widths, subnet_kernels, stage_kernel_choices
        )
    n_stages = len(stage_names)
    nets = [tuple(int(w) for w in widths) for widths in subnet_widths]
    if not nets:
        raise ValueError("subnet_widths: give at least one sub-network")
    for i, widths in enumerate(nets):
        if len(widths) != n_stages:
            raise ValueError(
                f"subnet_widths[{i}]: one width per stage ({', '.join(stage_names)}) is needed, got {list(widths)}"
            )
        bad = [f"{n}={w} (max {f})" for n, w, f in zip(stage_names, widths, full_widths) if not 0 < w <= f]
        if bad:
            raise ValueError(f"subnet_widths[{i}]: widths outside 1..the layer's size: {', '.join(bad)}")
    if len(set(nets)) != len(nets):
        raise ValueError("subnet_widths: the sub-networks must be distinct")
    pre = {widths[:gate_stage] for widths in nets}
    if len(pre) > 1:
        raise ValueError(
            f"subnet_widths: every sub-network must share the widths of the stages before the gate "
            f"({', '.join(stage_names[:gate_stage])}), got {sorted(pre)}"
        )
    widest = tuple(max(col) for col in zip(*nets))
    slimmest = tuple(min(col) for col in zip(*nets))
    if nets[-1] != widest or nets[0] != slimmest:
        raise ValueError(
            "subnet_widths: list the sub-networks slimmest first and widest last (the last must be at least as "
            f"wide as every other in every stage, the first at most as wide), got {[list(w) for w in nets]}"
        )
    names = tuple(stage_names)
    return [Subnet(i, widths, names, routed=True) for i, widths in enumerate(nets)]


def _explicit_kernel_subnets(
    stage_names: Sequence[str],
    subnet_widths: Sequence[Sequence[int]],
    gate_stage: int,
    full_widths: Sequence[int],
    subnet_kernels: Sequence[Sequence[int]],
    stage_kernel_choices: Sequence[Sequence[int]] | None,
) -> list[Subnet]:
    """:func:`explicit_subnets` for sub-networks that are per-stage widths and per-stage kernel sizes."""
    n_stages = len(stage_names)
    nets = [tuple(int(w) for w in widths) for widths in subnet_widths]
    kernels = [tuple(int(k) for k in ks) for ks in subnet_kernels]
    if not nets:
        raise ValueError("subnet_widths: give at least one sub-network")
    if len(kernels) != len(nets):
        raise ValueError(f"subnet_kernels: one entry per sub-network ({len(nets)}) is needed, got {len(kernels)}")
    choices = [tuple(c) for c in stage_kernel_choices] if stage_kernel_choices is not None else None
    for i, (widths, ks) in enumerate(zip(nets, kernels)):
        if len(widths) != n_stages:
            raise ValueError(
                f"subnet_widths[{i}]: one width per stage ({', '.join(stage_names)}) is needed, got {list(widths)}"
            )
        if len(ks) != n_stages:
            raise ValueError(
                f"subnet_kernels[{i}]: one kernel size per stage ({', '.join(stage_names)}) is needed, got {list(ks)}"
            )
        bad = [f"{n}={w} (max {f})" for n, w, f in zip(stage_names, widths, full_widths) if not 0 < w <= f]
        if bad:
            raise ValueError(f"subnet_widths[{i}]: widths outside 1..the layer's size: {', '.join(bad)}")
        if choices is not None:
            bad = [f"{n}={k} (choices {list(c)})" for n, k, c in zip(stage_names, ks, choices) if k not in c]
            if bad:
                raise ValueError(f"subnet_kernels[{i}]: kernel sizes the layers do not offer: {', '.join(bad)}")
    pairs = list(zip(nets, kernels))
    if len(set(pairs)) != len(pairs):
        raise ValueError("subnet_widths/subnet_kernels: the sub-networks must be distinct (in widths or kernels)")
    pre = {(w[:gate_stage], k[:gate_stage]) for w, k in pairs}
    if len(pre) > 1:
        raise ValueError(
            f"subnet_widths/subnet_kernels: every sub-network must share the widths and kernels of the stages "
            f"before the gate ({', '.join(stage_names[:gate_stage])}), got {sorted(pre)}"
        )
    widest, slimmest = tuple(max(c) for c in zip(*nets)), tuple(min(c) for c in zip(*nets))
    largest_k, smallest_k = tuple(max(c) for c in zip(*kernels)), tuple(min(c) for c in zip(*kernels))
    if pairs[-1] != (widest, largest_k) or pairs[0] != (slimmest, smallest_k):
        raise ValueError(
            "subnet_widths/subnet_kernels: list the sub-networks smallest first and largest last (the last must be "
            "at least as wide as every other in every stage and have its largest kernels, the first at most as wide "
            f"with the smallest kernels), got widths {[list(w) for w in nets]}, kernels {[list(k) for k in kernels]}"
        )
    names = tuple(stage_names)
    return [Subnet(i, w, names, routed=True, kernels=k) for i, (w, k) in enumerate(pairs)]


def _statistics_slots(subnets: Sequence[Subnet]) -> list[tuple[int, ...]]:
    """For each sub-network and stage, which BatchNorm statistics slot to use.

    A layer's input distribution depends on the widths (and kernel sizes, where
    the family slices kernels) of its own stage and of every stage before it.
    Sub-networks that agree on all of those see the same features there, so
    they share a slot (the lowest such sub-network index); any that differ get
    private statistics.
    """

    def prefix(net: Subnet, s: int) -> tuple:
        return net.widths[: s + 1], None if net.kernels is None else net.kernels[: s + 1]

    table = []
    for net in subnets:
        row = []
        for s in range(len(net.widths)):
            own = prefix(net, s)
            row.append(next(o.index for o in subnets if prefix(o, s) == own))
        table.append(tuple(row))
    return table


def check_input_dtype(model: nn.Module, x: Tensor) -> None:
    """``ValueError`` when ``x``'s floating dtype differs from the model's parameters' (outside autocast).

    torch's own message names neither; the fix is ``x.to(dtype)`` or ``model.to(dtype)``.
    """
    param = next(model.parameters(), None)
    if param is None or x.dtype == param.dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise ValueError(
        f"input dtype {x.dtype} does not match the model's parameter dtype {param.dtype}: "
        f"pass x.to({param.dtype}) or convert the model with model.to({x.dtype})"
    )


_FORCE = 1e9  # forced_routing's bias: far above any gate score


class _ForcedRouting:
    """What :meth:`DynamicNet.forced_routing` adds to the gate scores: one batch's one-hot bias per call."""

    def __init__(self, force: Tensor, batch: int) -> None:
        self.slices = list(force.split(batch))
        self.batch = batch
        self.position = 0

    def next_bias(self, n: int) -> Tensor:
        bias = self.slices[self.position]
        if n != bias.shape[0]:
            raise ValueError(f"forced routing was set up for batches of {self.batch}, got {n}")
        self.position = (self.position + 1) % len(self.slices)
        return bias


class _Plans(dict):
    """Sub-network -> (stamp, extracted network, watch lists) of :meth:`DynamicNet._static_plan`.

    A dict subclass, so tree utilities (``torch.export``'s attribute snapshot) take it as one leaf instead of
    walking into the module dictionaries it watches (which hold it: a cycle).
    """


class _RouteParts:
    """What :meth:`DynamicNet.route` runs at plain inference: the trunk, and each routed sub-network's post-gate part.

    The post-gate networks are built on first use (:meth:`DynamicNet.build_static_post`, BatchNorm folded) for the
    weights the entry was made for (a changed weight makes a new entry).
    """

    def __init__(self, trunk: nn.Module, layout: Callable[[nn.Module], nn.Module]) -> None:
        self.trunk = trunk
        self.layout = layout
        self.posts: dict[int, nn.Module] = {}

    def post_runner(self, model: DynamicNet) -> Callable[[Tensor, int], Tensor]:
        posts = self.posts

        def post(h: Tensor, subnet: int) -> Tensor:
            net = posts.get(subnet)
            if net is None:
                net = posts[subnet] = _inference_net(model.build_static_post(subnet), self.layout)
            return net(h)

        return post

    def modules(self) -> list[nn.Module]:
        return [self.trunk, *self.posts.values()]


def _inference_net(net: nn.Module, layout: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A built plain network as the plans run it: BatchNorm folded, activations and residual sums in place, eval
    mode, the model's memory layout."""
    fold_batchnorms(net)
    inplace_inference(net)
    return layout(net.eval())


def _plan_stamp(tensors: list[Tensor]) -> tuple:
    """What makes a cached plan (:meth:`DynamicNet._static_plan`) stale, read on every call: the version counter of
    every tensor (in-place updates: optimiser steps, BatchNorm statistics) and where the first one is stored (a
    ``.to()`` moves every tensor and bumps no version counter; it also replaces the buffers, so one parameter
    stands for all). Reading each tensor's storage as :func:`~dsnet.layers.sliced.version_stamp` does costs twice
    as much on a call that runs a small network."""
    if not tensors:
        return ()
    try:
        return tuple([t._version for t in tensors]), tensors[0].data_ptr(), tensors[0].dtype
    except RuntimeError:  # inference tensors (made inside inference_mode) have no version counter
        return version_stamp(*tensors), tensors[0].dtype


class DynamicNet(nn.Module):
    """Base class of dsnet's dynamic supernets. Subclasses set up the layers.

    Call ``model(x)`` for dynamic inference (the gate picks a sub-network per
    sample), ``model(x, subnet=k)`` to run sub-network ``k`` for the batch, or
    ``model(x, width=0.6)`` for the routed sub-network nearest that width
    multiplier (see :meth:`subnet_for_width`).

    ``subnet_widths`` (a family constructor argument) replaces the index-aligned
    per-stage choices by an explicit list of sub-networks, one width per stage
    each (see :func:`explicit_subnets`): a US-Nets width grid, a searched
    non-uniform set, or a single network trained alone. Families that slice
    kernel sizes too (``dsnet.models.mbv2``) pass ``subnet_kernels`` with it
    (one kernel size per stage each) and ``stage_kernel_choices`` (what each
    stage's layers offer): then a sub-network is its widths and its kernels
    (``Subnet.kernels``), with private BatchNorm statistics per combination.

    ``router`` (a family constructor argument too) is the routing rule the
    head is read with (``dsnet.layers.gate.ROUTERS``): ``"logits"`` (the
    paper's SGS-trained logits) or ``"utility"`` [ours] (the head predicts, per
    choice, the logit of P(that choice is right); the gate scores are their
    sigmoids). Either way an operating point is ``argmax(scores + b *
    bias_direction())`` (see :meth:`bias_direction`).
    """

    gate: DynamicGate
    gate_mode: str = "exit"  # "exit" [ours, the default]: see set_gate_mode; "pre": the paper's gate
    router: str = "logits"  # "logits": the paper's; "utility": see bias_direction

    def __init__(
        self,
        stage_names: Sequence[str],
        stage_widths: Sequence[Sequence[int]],
        gate_stage: int,
        in_chans: int,
        num_classes: int,
        input_size: tuple[int, int, int],
        routing_space: Sequence[int] | None,
        subnet_widths: Sequence[Sequence[int]] | None = None,
        router: str = "logits",
        subnet_kernels: Sequence[Sequence[int]] | None = None,
        stage_kernel_choices: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if subnet_kernels is not None and subnet_widths is None:
            raise ValueError("subnet_kernels needs subnet_widths: one kernel size per stage for each sub-network")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
        self.router = router
        self.gate_stage = gate_stage
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.default_input_size = input_size
        if subnet_widths is None:
            self.subnets: list[Subnet] = build_subnets(stage_names, stage_widths, gate_stage)
        else:
            if not 0 < gate_stage < len(stage_widths):
                raise ValueError(f"gate_stage must name a stage after the first, got {gate_stage}")
            full = [max(w) for w in stage_widths]
            self.subnets = explicit_subnets(
                stage_names, subnet_widths, gate_stage, full, subnet_kernels, stage_kernel_choices
            )
            stage_widths = [sorted({net.widths[s] for net in self.subnets}) for s in range(len(stage_names))]
        self.stage_widths = [list(w) for w in stage_widths]
        # kernel sizes the sub-networks use per stage (families with kernel slicing), else None
        self.stage_kernels: list[list[int]] | None = (
            None
            if subnet_kernels is None
            else [sorted({net.kernels[s] for net in self.subnets}) for s in range(len(stage_names))]  # type: ignore[index]
        )
        self._slots = _statistics_slots(self.subnets)
        routed = [s.index for s in self.subnets if s.routed]
        self.routing_space: list[int] = (
            list(range(min(4, len(routed)))) if routing_space is None else list(routing_space)
        )
        bad = [k for k in self.routing_space if k not in routed]
        if bad or not self.routing_space or len(set(self.routing_space)) != len(self.routing_space):
            raise ValueError(
                f"routing_space must be distinct routed sub-network indices {routed[0]}..{routed[-1]}, "
                f"got {self.routing_space}"
            )
        self.routing_space = sorted(self.routing_space)
        self._macs_cache: dict[tuple, list[int]] = {}
        self._space_cache: dict[tuple, Tensor] = {}  # routing_space, list gate biases: tensors per device (route)
        self._forced: _ForcedRouting | None = None  # set inside forced_routing()
        self.exit_head: ExitHead | None = None  # set by set_gate_mode in "exit" mode
        # sub-network -> (stamp, extracted network, modules): see _static_plan; off under a bounded cache
        self._plans = _Plans()
        self._plans_on = True

    # ----------------------------------------------------------- subclass API
    def forward_pre(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward_post(self, h: Tensor, subnet: int) -> Tensor:
        raise NotImplementedError

    def build_static(self, subnet: int) -> nn.Module:
        raise NotImplementedError

    def forward_gate(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        """The gate on the features entering it (the last step of :meth:`forward_pre`): ``(h, z)``.

        ``x`` is what :meth:`build_static_trunk` computes; ``h`` is ``x`` with the gate's attention applied and ``z``
        the gate's encoding. Families whose gate reads a statistics slot override it.
        """
        z = self.gate.encode(x)
        return self.gate.attend(x, z), z

    def build_static_trunk(self, subnet: int) -> nn.Module | None:
        """Sub-network ``subnet``'s layers before the gate as a plain network (images -> the gate's input), or None.

        With :meth:`build_static_post` it is :meth:`build_static` cut at the gate (BatchNorms unfolded, the gate
        left out): dynamic inference at plain inference runs the two (see :meth:`route`). None (the default): the
        family has no such split and routing runs the sliced layers.
        """
        return None

    def build_static_post(self, subnet: int) -> nn.Module | None:
        """Sub-network ``subnet``'s layers after the gate as a plain network (attended features -> logits), or None.

        The same function as :meth:`forward_post` in eval mode; see :meth:`build_static_trunk`.
        """
        return None

    def set_gate_mode(self, gate_mode: str | None) -> None:
        """Choose the routing head; the supernet's weights stay as they are.

        Families call it once their gate exists (the exit head reads the gate's encoding width).

        ``"exit"`` [ours, what the measurements support; the default]: the
        slimmest routed sub-network runs for every sample first and an
        :class:`~dsnet.layers.gate.ExitHead` decides, from the gate's encoding
        and the slimmest's prediction, whether to stop there (choice 0) or to
        run a wider routed sub-network after the gate (choice ``j``). ``"pre"``
        (the paper's): the slimming head routes from the pre-gate features,
        before any routed layer. ``None``: ``"exit"`` when there are two or more
        routing choices, else ``"pre"`` (one choice leaves nothing to decide).

        Switching to ``"exit"`` builds a freshly initialised exit head (stage II
        trains it) on the gate's device and dtype, drawn from a forked random
        stream so that building it leaves the global one (stage I's sampling,
        shuffling) as it was; switching to ``"pre"`` drops it.
        """
        if gate_mode is None:
            gate_mode = DEFAULT_GATE_MODE if len(self.routing_space) >= 2 else "pre"
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {', '.join(GATE_MODES)}, got {gate_mode!r}")
        if gate_mode == "exit" and self.exit_head is None:
            if len(self.routing_space) < 2:
                raise ValueError("gate_mode='exit' needs at least two routing choices")
            ref = next(self.gate.parameters())
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed((torch.initial_seed() + 1) % 2**63)  # reproducible per seed
                head = ExitHead(self.gate.reduced, self.num_classes, len(self.routing_space))
            self.exit_head = head.to(device=ref.device, dtype=ref.dtype)
        elif gate_mode == "pre":
            self.exit_head = None
        self.gate_mode = gate_mode
        self._macs_cache.clear()  # the routing head's MACs are part of every routed count

    @staticmethod
    def gate_mode_of(state: dict) -> str:
        """The gate mode a state dict was saved in: ``"exit"`` if it holds an exit head, else ``"pre"``."""
        return "exit" if any(str(k).startswith(EXIT_HEAD_PREFIX) for k in state) else "pre"

    def routing_heads(self) -> list[nn.Module]:
        """The heads only stage II trains (the slimming head; the exit head in "exit" mode): stage I freezes them."""
        return [self.gate.slim_head] + ([self.exit_head] if self.exit_head is not None else [])

    # ------------------------------------------------------------- helpers
    @property
    def num_slots(self) -> int:
        """BatchNorm statistics slots every sliced BN of this model holds."""
        return len(self.subnets)

    def slots(self, subnet: int) -> tuple[int, ...]:
        """The statistics slot of each stage for ``subnet``."""
        return self._slots[subnet]

    @property
    def largest(self) -> int:
        return len(self.subnets) - 1

    def check_subnet(self, subnet: int) -> int:
        if isinstance(subnet, bool) or not isinstance(subnet, int):
            raise TypeError(f"subnet must be an int index, got {subnet!r}")
        if not 0 <= subnet < len(self.subnets):
            raise IndexError(
                f"subnet index {subnet} out of range: this model has {len(self.subnets)} "
                f"sub-networks (0..{len(self.subnets) - 1})"
            )
        return subnet

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"expected a batch of images shaped (N, {self.in_chans}, H, W), got a {x.dim()}-D tensor "
                f"of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"create the model with in_chans={x.shape[1]} for such data"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {x.dtype}")
        check_input_dtype(self, x)

    def width_multiple(self, stage: int) -> int:
        """The channel multiple widths of ``stage`` are rounded to (fast kernels want multiples of 8)."""
        return 8

    def width_ratio(self, subnet: int) -> float:
        """Width multiplier of a sub-network: its routed stages' widths over the widest routed one's, averaged."""
        widest = self.subnets[[s.index for s in self.subnets if s.routed][-1]].widths
        widths = self.subnets[self.check_subnet(subnet)].widths
        stages = range(self.gate_stage, len(widths))
        return sum(widths[s] / widest[s] for s in stages) / len(stages)

    def subnet_for_width(self, width: float) -> int:
        """The routed sub-network whose width multiplier is nearest ``width`` (ties: the wider one)."""
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.0 < width <= 1.0:
            raise ValueError(f"width must be a multiplier in (0, 1], got {width!r}")
        routed = [s.index for s in self.subnets if s.routed]
        return min(routed, key=lambda k: (abs(self.width_ratio(k) - width), -self.width_ratio(k)))

    @property
    def block_stages(self) -> tuple[int, ...]:
        """The stage of each block of ``self.blocks``: an index into a sub-network's widths (the stem is stage 0).

        For families built of blocks grouped into stages (DS-ResNet, DS-MobileNetV1): block ``i`` runs at
        width ``subnets[k].widths[block_stages[i]]`` in sub-network ``k``. ``NotImplementedError`` for a family
        that is not organised that way.
        """
        stages = getattr(self, "_block_stage", None)  # each such family records it while building its blocks
        if stages is None:
            raise NotImplementedError(f"{type(self).__name__} does not group its layers into blocks of stages")
        return tuple(stages)

    @property
    def gate_state_prefix(self) -> str:
        """Where the gate's tensors sit in ``state_dict()``: ``gate_state_prefix + "reduce.weight"`` names one.

        (``"_gate."`` for DS-ResNet; in DS-MobileNetV1 the gate is the squeeze-excitation of its block.)
        """
        gate = self.gate
        for name, module in self.named_modules():
            if module is gate:
                return f"{name}."
        raise ValueError(f"{type(self).__name__}: its gate is not one of its submodules")

    def sliced_batchnorms(self) -> list[SlicedBatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, SlicedBatchNorm2d)]

    def routing_head(self) -> nn.Module:
        """The module stage II trains: the slimming head (``"pre"``) or the exit head (``"exit"``)."""
        return self.exit_head if self.exit_head is not None else self.gate.slim_head

    # --------------------------------------------------------- inference cache
    def _tensor_caches(self) -> list[TensorCache]:
        return [v for m in self.modules() for v in vars(m).values() if isinstance(v, TensorCache)]

    def clear_inference_cache(self) -> None:
        """Drop every cached contiguous weight slice, folded conv+BN weight and per-width argument tuple.

        Cached entries are stamped with their parameters' version counters and
        storage, so optimiser steps that go through autograd-visible in-place
        ops, ``load_state_dict`` and ``.to()`` invalidate them by themselves.
        Two kinds of update bypass version counters and are *not* seen: writes
        through ``param.data`` and fused optimisers (``torch.optim.SGD(...,
        fused=True)``); nor are in-place writes to a model's tensors inside
        ``torch.inference_mode()`` (inference tensors have no version counter;
        ``load_state_dict`` clears the cache itself). Switching modes
        (``model.train()`` / ``model.eval()``) clears the cache, which covers
        the usual train-then-evaluate loop; after such an update in eval mode,
        call this.
        """
        for module in self.modules():
            clear_caches(module)
        self.__dict__.get("_plans", _Plans()).clear()

    def set_inference_cache(self, enabled: bool = True, max_bytes: int | None = None) -> None:
        """Turn the inference cache off (``enabled=False``) or bound its memory (``max_bytes``; None: unbounded).

        The cache keeps, per width (and statistics slot, and autocast dtype), contiguous weight slices and
        BatchNorm-folded convolution weights: about one compact copy of the weights of every sub-network that
        ran (see :meth:`inference_cache_bytes`). Dynamic inference over the routing space holds 1.3-1.8x the
        model's parameter bytes (measured, float32: ds_resnet8_tiny 1.7x, ds_resnet20_cifar 1.8x,
        ds_mobilenet_v1 1.3x); running every sub-network (a sweep over all of them) up to the sum of their sizes
        (2.7x, 2.8x, 7.7x: ds_mobilenet_v1 has 15); each autocast dtype adds its own copies. With ``max_bytes``
        the least recently used entries are dropped first (a bound below what the routed sub-networks need
        trades memory for re-slicing and re-folding on calls that miss); off, every call slices (and folding is
        skipped). ``model(x, subnet=k)`` at plain inference runs a cached extracted network instead (see
        :meth:`_static_plan`), and dynamic inference its plain parts (:meth:`route`): on only when the cache is on and
        unbounded. Clears the cache.
        """
        budget = CacheBudget(enabled, max_bytes)
        self.clear_inference_cache()
        self._plans_on = enabled and max_bytes is None
        for cache in self._tensor_caches():
            cache.budget = budget

    def inference_cache_bytes(self) -> int:
        """Bytes the inference cache holds beyond the model's own parameters and buffers (copies only)."""
        own = {t.untyped_storage().data_ptr() for t in [*self.parameters(), *self.buffers()]}
        held: dict[int, int] = {}
        for cache in self._tensor_caches():
            held.update(cache.nbytes(exclude=own))
        for plan in self.__dict__.get("_plans", _Plans()).values():
            built = plan[1]
            nets = built.modules() if isinstance(built, _RouteParts) else [] if built is None else [built]
            for t in [t for net in nets for t in (*net.parameters(), *net.buffers())]:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in own:
                    held[ptr] = t.untyped_storage().nbytes()
        return sum(held.values())

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = _Plans()  # cached extracted networks (_static_plan): rebuilt on use, never saved or copied
        return state

    def train(self, mode: bool = True) -> DynamicNet:
        self.clear_inference_cache()  # weights may have changed in ways version counters miss (see above)
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.clear_inference_cache()  # in inference_mode the copies move no version counter
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        subnet: int | None = None,
        *,
        width: float | None = None,
        return_routing: bool = False,
        gate_bias: Tensor | Sequence[float] | None = None,
    ) -> Tensor | RoutingResult:
        """Dynamic inference, or sub-network ``subnet`` for the whole batch.

        ``width`` (a multiplier in (0, 1]) picks the routed sub-network nearest
        it instead of an index (US-Nets style; see :meth:`subnet_for_width`).
        ``gate_bias`` (one value per routing choice) is added to the gate's
        logits: positive values on slim choices trade accuracy for compute
        without retraining. ``return_routing=True`` returns a
        :class:`RoutingResult` with the decisions.
        """
        self.check_input(x)
        if width is not None:
            if subnet is not None:
                raise ValueError("pass subnet or width, not both")
            subnet = self.subnet_for_width(width)
        if subnet is not None:
            if return_routing or gate_bias is not None:
                raise ValueError("return_routing and gate_bias apply to dynamic inference (subnet=None) only")
            k = self.check_subnet(subnet)
            plan = self._static_plan(x, k)
            if plan is not None:
                return plan(x)
            h, _ = self.forward_pre(x, k)
            return self.forward_post(h, k)
        result = self.route(x, gate_bias=gate_bias)
        return result if return_routing else result.logits

    def _static_plan(self, x: Tensor, k: int) -> nn.Module | None:
        """The extracted network of sub-network ``k``, cached, that ``model(x, subnet=k)`` runs at plain inference.

        Built on the second call that finds the model's weights unchanged (the first runs the sliced layers), so
        weights updated between calls (an EMA teacher's) never pay for an extraction. Plain inference: eval mode,
        no gradient recorded, not traced or compiled, no autocast, a plain tensor
        input, the inference cache on and unbounded (:meth:`set_inference_cache`), and no forward hook or replaced
        ``forward`` on any module of the model (a hooked module must see its own call). Then one cached
        :meth:`extract` (BatchNorm folded, channels-last when the model's weights are) runs instead of the sliced
        layers: the same function, without their per-layer Python (batch 1 pays it per layer; ``docs/benchmarks.md``
        "Static plans"). Its stamp (:func:`_plan_stamp`) covers the version counter of every parameter and
        buffer of the model and the storage of the first, so optimiser steps, in-place writes, ``load_state_dict``
        and ``.to()`` rebuild it as they refresh the layer caches; it holds one compact copy of the sub-network's
        weights (:meth:`inference_cache_bytes` counts it).
        """
        return self._cached_plan(x, k, lambda layout: _inference_net(self.build_static(k), layout))

    def _route_plan(self, x: Tensor) -> _RouteParts | None:
        """The plain networks dynamic inference runs at plain inference (see :meth:`route`), or None.

        The conditions, the stamp and the build-on-second-sight rule are :meth:`_static_plan`'s. The trunk
        (:meth:`build_static_trunk`) is built with the entry; each routed sub-network's post-gate network
        (:meth:`build_static_post`) on its first use, BatchNorm folded like :meth:`extract`'s. None also where the
        family has no split (it does not override :meth:`build_static_trunk`).
        """
        if type(self).build_static_trunk is DynamicNet.build_static_trunk:  # the family has no split
            return None

        def build(layout: Callable[[nn.Module], nn.Module]) -> _RouteParts:
            return _RouteParts(_inference_net(self.build_static_trunk(self.routing_space[0]), layout), layout)

        return self._cached_plan(x, "route", build)

    def _cached_plan(
        self, x: Tensor, key: object, build: Callable[[Callable[[nn.Module], nn.Module]], _T]
    ) -> _T | None:
        """A plan (a plain network) under ``key`` for the model's current weights, built by ``build(layout)``.

        ``layout(module)`` moves a built module to channels-last when the model's weights are. None when the call
        is not plain inference (see :meth:`_static_plan`), on the first sight of these weights, or when a module
        is hooked.
        """
        if (
            self.training
            or torch.is_grad_enabled()
            or type(x) is not Tensor
            or torch.compiler.is_compiling()
            or not self.__dict__.get("_plans_on", True)
            or torch.is_autocast_enabled(x.device.type)
        ):
            return None
        plans = self.__dict__.setdefault("_plans", _Plans())
        hit = plans.get(key)
        if hit is not None:
            # hot path: the watch lists were gathered when the entry was made (a parameter *object* replaced
            # since then, rather than updated or moved, is not seen: clear_inference_cache())
            stamp, static, hooks, dicts, tensors = hit
            if not any(hooks) and not any("forward" in d for d in dicts) and stamp == _plan_stamp(tensors):
                if static is None:  # the second call with these weights: worth building
                    channels_last = any(stored_channels_last(t) for t in tensors)

                    def layout(module: nn.Module) -> nn.Module:
                        return module.to(memory_format=torch.channels_last) if channels_last else module

                    static = build(layout)
                    plans[key] = (stamp, static, hooks, dicts, tensors)
                return static
        modules = list(self.modules())
        hooks = [h for m in modules for h in (m._forward_hooks, m._forward_pre_hooks)]
        dicts = [m.__dict__ for m in modules]
        if any(hooks) or any("forward" in d for d in dicts):
            return None
        tensors = [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
        tensors.sort(key=lambda t: not t.is_floating_point())  # the anchors _plan_stamp moves with: floats first
        # first sight of these weights: remember them and run the sliced layers; a plan is built on the next call
        # that finds them unchanged (weights that change on every call, as an EMA teacher's, never pay for one)
        plans[key] = (_plan_stamp(tensors), None, hooks, dicts, tensors)
        return None

    def route(self, x: Tensor, gate_bias: Tensor | Sequence[float] | None = None, tau: float = 1.0) -> RoutingResult:
        """Per-sample routing inside a batch (SPEC section 4).

        Training mode samples straight-through Gumbel-softmax decisions and
        scales each output by its (unit) one-hot weight so the gate receives a
        gradient; eval mode takes the argmax of the logits, no noise.

        At plain inference (the conditions of :meth:`_static_plan`) the layers
        before the gate and each routed sub-network's layers after it run as
        cached plain, BatchNorm-folded networks (:meth:`build_static_trunk`,
        :meth:`build_static_post`) instead of the sliced layers: the same
        routing and outputs without the sliced layers' per-layer Python. The
        gate and the exit head run as they are.
        """
        parts = self._route_plan(x)
        if parts is None:
            post = self.forward_post
            h, z = self.forward_pre(x, self.routing_space[0])
            gate_logits, slim_out = self.gate_logits(h, z)
        else:  # plain inference: the trunk and the post-gate parts as plain, BatchNorm-folded networks
            post = parts.post_runner(self)
            h, z = self.forward_gate(parts.trunk(x), self.routing_space[0])
            slim_out = None if self.exit_head is None else post(h, self.routing_space[0])
            scores, slim_out = self.gate_scores(h, z, slim_out)
            gate_logits = scores + self.gate.budget_bias
        if gate_bias is not None:
            gate_logits = gate_logits + self._gate_bias_on(gate_bias, gate_logits)
        forced = getattr(self, "_forced", None)  # (a model pickled before forced_routing existed has none)
        if forced is not None:
            gate_logits = gate_logits + forced.next_bias(gate_logits.shape[0])
        if self.training and self.router == "logits":
            onehot = straight_through_gumbel(gate_logits, tau)
            choice = onehot.argmax(dim=1)
        else:  # eval mode; the utility router has no sampling in training either (hard one-hot, no noise)
            choice = gate_logits.argmax(dim=1)
            onehot = None
            if self.training:
                onehot = torch.nn.functional.one_hot(choice, len(self.routing_space)).to(gate_logits.dtype)
        logits = self._run_groups(h, choice, onehot, slim_out, post)
        return RoutingResult(logits, self._routing_space_on(choice.device)[choice], choice, gate_logits, onehot)

    @contextmanager
    def forced_routing(self, choices: Tensor, batch_size: int | None = None) -> Iterator[None]:
        """Inside the block, dynamic inference (``model(x)``, :meth:`route`) sends sample ``i`` to ``choices[i]``.

        For benchmarks and export checks, which want a known routing mix on any weights. ``choices`` index
        :attr:`routing_space`. With ``batch_size`` smaller than ``len(choices)`` (which it must divide),
        successive calls consume successive slices of ``choices``, cycling: batch-1 latency over a routing mix
        is a cycle of single-image calls. Nothing else changes: the gate's real scores are still computed (its
        cost is paid) and a one-hot bias far larger than any score decides; grouping, scatter and everything
        after the gate are the model's own dynamic inference. :meth:`gate_logits` itself is not forced. On
        leaving the block the model routes by its gate again (an outer ``forced_routing`` resumes).
        """
        n_choices = len(self.routing_space)
        if choices.dim() != 1 or not choices.numel() or int(choices.min()) < 0 or int(choices.max()) >= n_choices:
            raise ValueError(f"choices must be a non-empty 1-D tensor of routing-choice indices 0..{n_choices - 1}")
        batch = choices.numel() if batch_size is None else batch_size
        if batch < 1 or choices.numel() % batch:
            raise ValueError(f"{choices.numel()} choices do not split into batches of {batch}")
        ref = next(self.gate.parameters())
        force = torch.nn.functional.one_hot(choices, n_choices).to(ref.device, ref.dtype) * _FORCE
        outer, self._forced = getattr(self, "_forced", None), _ForcedRouting(force, batch)
        try:
            yield
        finally:
            self._forced = outer

    def _routing_space_on(self, device: torch.device) -> Tensor:
        """``routing_space`` as a tensor on ``device``, built once per device (route runs every call)."""
        key = (device, tuple(self.routing_space))
        space = self._space_cache.get(key)
        if space is None:
            with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
                space = self._space_cache[key] = torch.tensor(self.routing_space, device=device)
        return space

    def _gate_bias_on(self, gate_bias: Tensor | Sequence[float], like: Tensor) -> Tensor:
        """``gate_bias`` checked, as a tensor of ``like``'s dtype and device.

        A tensor is checked on every call; a list or tuple of numbers (the knob's usual form) is converted and
        checked once per value, dtype and device and kept (a few entries), so a call copies nothing to the device.
        """
        key = None
        if not isinstance(gate_bias, Tensor):
            try:
                key = ("gate_bias", tuple(float(v) for v in gate_bias), like.dtype, like.device)
            except (TypeError, ValueError):
                key = None  # not a flat sequence of numbers: the checks below say what is wrong
            if key is not None and key in self._space_cache:
                return self._space_cache[key]
        # one to keep is made a normal tensor (usable in and out of inference mode); others as the caller's mode
        with torch.inference_mode(key is None and torch.is_inference_mode_enabled()):
            bias = torch.as_tensor(gate_bias, dtype=like.dtype, device=like.device)
        if bias.shape != (len(self.routing_space),):
            raise ValueError(
                f"gate_bias needs one value per routing choice ({len(self.routing_space)}), "
                f"got shape {tuple(bias.shape)}"
            )
        if not bool(torch.isfinite(bias).all()):
            raise ValueError(f"gate_bias must be finite, got {bias.tolist()} (nan/inf would route every input)")
        if key is not None:
            if len(self._space_cache) > 64:  # a sweep over many knob values: start again, do not grow
                self._space_cache.clear()
            self._space_cache[key] = bias
        return bias

    def gate_logits(self, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Gate scores with the stored budget bias: what the argmax of dynamic inference reads.

        The scores are :meth:`gate_scores` (the head's logits for
        ``router="logits"``, probabilities for ``"utility"``). In ``"exit"``
        mode the slimmest routed sub-network runs first and its output is
        returned too (choice 0's answer, already paid for); ``None`` in
        ``"pre"`` mode.
        """
        scores, slim_out = self.gate_scores(h, z)
        return scores + self.gate.budget_bias, slim_out

    def gate_scores(self, h: Tensor, z: Tensor, slim_out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """As :meth:`gate_logits` without the stored budget bias: what a knob bias is added to.

        ``router="logits"``: the head's logits (:meth:`raw_gate_logits`);
        ``"utility"``: their sigmoids, each choice's predicted probability of
        being right, so a bias is in accuracy units.
        """
        raw, slim_out = self.raw_gate_logits(h, z, slim_out)
        return routing_scores(raw, self.router), slim_out

    def bias_direction(self, input_size: Sequence[int] | None = None) -> Tensor:
        """The per-choice vector a scalar knob ``b`` scales: every operating point is ``argmax(scores + b * dir)``.

        ``router="logits"``: :func:`~dsnet.layers.gate.bias_ramp` (``+1`` on
        the slimmest to ``-1`` on the widest). ``"utility"``:
        :func:`~dsnet.layers.gate.cost_direction` of :meth:`routing_macs` at
        ``input_size``, ``-(c - mean(c))`` with ``c`` the MACs relative to the
        widest choice, so ``b`` is ``lam`` in ``argmax_j p_j - lam * c_j``.
        Either way ``b > 0`` saves compute, and ``model(x, gate_bias=b * dir)``
        is that operating point. A float32 CPU tensor.
        """
        if self.router == "logits":
            return bias_ramp(len(self.routing_space))
        return cost_direction(self.routing_macs(input_size))

    def raw_gate_logits(self, h: Tensor, z: Tensor, slim_out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The routing head's outputs, no budget bias, no sigmoid (what stage II trains).

        In ``"exit"`` mode, ``slim_out`` (the slimmest's logits on ``h``) is used if the caller already has it.
        """
        if self.exit_head is None:
            return self.gate.raw_logits(z), None
        if slim_out is None:
            slim_out = self.forward_post(h, self.routing_space[0])
        return self.exit_head(z, slim_out), slim_out

    def _run_groups(
        self,
        h: Tensor,
        choice: Tensor,
        onehot: Tensor | None,
        slim_out: Tensor | None = None,
        post: Callable[[Tensor, int], Tensor] | None = None,
    ) -> Tensor:
        """Run each group of samples that chose the same sub-network as one dense batch.

        One gather sorts the batch by decision (the groups are then views of
        it), one ``index_copy`` puts the outputs back in input order. A
        channels-last feature map is gathered as NHWC so the groups stay
        channels-last (``index_select`` on the NCHW view would hand back
        NCHW-contiguous groups, and every later convolution would run in the
        slower layout).
        """
        counts = torch.bincount(choice, minlength=len(self.routing_space)).tolist()
        forward_post = self.forward_post if post is None else post

        def run(part: Tensor, j: int, rows: Tensor | None) -> Tensor:
            if j == 0 and slim_out is not None:  # exit mode: the slimmest's answer is already computed
                return slim_out if rows is None else slim_out.index_select(0, rows)
            return forward_post(part, self.routing_space[j])

        if max(counts) == h.shape[0]:  # the whole batch agrees: no gather/scatter
            j = counts.index(h.shape[0])
            out = run(h, j, None)
            return out if onehot is None else out * onehot[:, j : j + 1]
        order = torch.argsort(choice, stable=True)
        if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
            grouped = h.permute(0, 2, 3, 1).index_select(0, order).permute(0, 3, 1, 2)
        else:
            grouped = h.index_select(0, order)
        weights = None if onehot is None else onehot.index_select(0, order).split(counts)
        rows = order.split(counts)
        outs = []
        for j, part in enumerate(grouped.split(counts)):
            if part.shape[0] == 0:
                continue
            out = run(part, j, rows[j])
            if weights is not None:
                out = out * weights[j][:, j : j + 1]
            outs.append(out)
        sorted_out = torch.cat(outs)
        return sorted_out.new_empty(sorted_out.shape).index_copy(0, order, sorted_out)

    # ----------------------------------------------------------- extraction
    def extract(self, subnet: int, fold_bn: bool = True, *, inplace: bool = False) -> nn.Module:
        """A plain ``torch.nn`` network equal to sub-network ``subnet`` in eval mode, with compact weight copies.

        ``fold_bn=True`` (default): every BatchNorm that follows a convolution is folded into it (an
        ``nn.Conv2d`` with bias, the BatchNorm removed), which is what inference and export want; the result
        computes the eval-mode function in either mode. ``fold_bn=False`` keeps the BatchNorms (with this
        sub-network's statistics), for fine-tuning or recalibration. ``inplace=True``: activations and residual
        sums written in place without autograd (:func:`~dsnet.models.static.inplace_inference`, as the cached
        plans run), the same values, faster; for serving and timing, not for a network whose layers are hooked.
        """
        if not isinstance(fold_bn, bool):
            raise TypeError(f"fold_bn must be True or False, got {fold_bn!r}")
        k = self.check_subnet(subnet)
        static = self.build_static(k)
        if fold_bn:
            fold_batchnorms(static)
        if inplace:
            inplace_inference(static)
        return static.train(self.training)

    # ----------------------------------------------------------------- MACs
    def subnet_macs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """Multiply-adds per sample of every sub-network at ``input_size`` (C, H, W)."""
        from dsnet.utils.flops import count_forward_macs

        size = tuple(input_size or self.default_input_size)
        if size not in self._macs_cache:
            x = torch.zeros((1, *size), device=next(self.parameters()).device)
            self._macs_cache[size] = [
                count_forward_macs(self, lambda k=k: self(x, subnet=k), 1) for k in range(len(self.subnets))
            ]
        return list(self._macs_cache[size])

    def pre_gate_macs(self, input_size: Sequence[int] | None = None) -> int:
        """Multiply-adds per sample of the shared pre-gate part (gate encoder and attention head included)."""
        from dsnet.utils.flops import count_forward_macs

        size = tuple(input_size or self.default_input_size)
        key = ("pre", *size)
        if key not in self._macs_cache:
            x = torch.zeros((1, *size), device=next(self.parameters()).device)
            self._macs_cache[key] = [count_forward_macs(self, lambda: self.forward_pre(x, self.routing_space[0]), 1)]
        return self._macs_cache[key][0]

    def gate_head_macs(self) -> int:
        """Multiply-adds of the routing decision itself (slimming head, or exit head)."""
        if self.exit_head is not None:
            return self.exit_head.macs()
        return self.gate.reduced * self.gate.num_choices

    def routing_macs(self, input_size: Sequence[int] | None = None) -> Tensor:
        """MACs per sample of each routing choice, routing head included (float tensor).

        ``"pre"`` mode: the choice's sub-network. ``"exit"`` mode: the slimmest
        for choice 0; for ``j > 0`` the slimmest plus the post-gate part of
        sub-network ``j`` (the pre-gate part runs once).
        """
        table = self.subnet_macs(input_size)
        head = self.gate_head_macs()
        if self.exit_head is None:
            return torch.tensor([float(table[k] + head) for k in self.routing_space])
        slim, pre = table[self.routing_space[0]], self.pre_gate_macs(input_size)
        extra = [0] + [table[k] - pre for k in self.routing_space[1:]]
        return torch.tensor([float(slim + e + head) for e in extra])

    def extra_repr(self) -> str:
        return f"subnets={len(self.subnets)}, routing_space={self.routing_space}"
