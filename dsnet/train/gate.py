"""Stage II: gate training (SPEC section 3).

The supernet is frozen (BN in eval mode); only the routing head trains -- the
gate's slimming head, or with ``gate.mode: exit`` an early-exit head that
decides after the slimmest sub-network ran (:class:`dsnet.layers.gate.ExitHead`)
-- on three losses (:class:`GateObjective`):

* **SGS** (sandwich gate sparsification): the slimmest and widest routed
  sub-networks label each image -- easy or hopeless -> slimmest, otherwise
  widest -- and the gate logits learn those labels (softmax applied once);
  ``sgs_targets: cheapest`` labels with the cheapest choice that is right;
* **task**: cross-entropy of the dynamically routed output. By default every
  routing choice's output enters, weighted by the straight-through one-hot
  decision, so each choice gets a gradient (``task_loss``);
* **complexity**: ``lambda * (mean MACs / unit)^2`` with MACs from the
  straight-through decision (forward = the real routed cost), or, with a
  target budget, ``lambda * ((mean MACs - target) / unit)^2``.

With ``gate.router: utility`` [ours] (the model's ``router="utility"``) the
head instead learns, per routing choice, the logit of P(that choice classifies
the image correctly): binary cross-entropy against the frozen supernet's
per-choice correctness, no Gumbel noise, no SGS, task or complexity term (the
weights of those are ignored). Compute is traded at run time, by the knob of
:meth:`~dsnet.models.base.DynamicNet.bias_direction` (``argmax_j p_j - lam *
c_j``), and a budget is met by :func:`calibrate_budget` as for the logits.

The backbone runs once per batch up to the gate, then each choice's post-gate
part once on the whole batch. With a budget, the stored budget bias is then
calibrated on held-out training images (``data.holdout``) to meet it.

A budget in milliseconds (``gate.target_ms`` with ``gate.latency_table``, a
table ``dsnet bench --latency-table`` measured on the deployment machine; see
:mod:`dsnet.utils.latency`) is met by the same knob: the calibration prices a
routing at ``sum_j share_j * ms_j`` instead of its MACs, and the complexity
loss sees the table's costs scaled so the widest routed choice costs its MACs
(:func:`latency_cost_table`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dsnet.layers.gate import straight_through_gumbel
from dsnet.models.base import DynamicNet
from dsnet.train.checkpoint import load_model, load_state_into
from dsnet.train.config import load_config
from dsnet.train.distributed import DistContext, init_distributed
from dsnet.train.loop import TrainLoop
from dsnet.train.losses import cheapest_correct_targets, complexity_loss, sgs_targets
from dsnet.train.optim import MaskedSGD
from dsnet.train.run import RunDir, autocast, effective_lr, seed_everything, selection_loader, split_sizes
from dsnet.utils.latency import LatencyTable, choice_latencies
from dsnet.utils.modes import temporary_mode
from dsnet.utils.threads import set_threads

__all__ = [
    "GateObjective",
    "gate_step",
    "train_gate",
    "freeze_backbone",
    "evaluate_dynamic",
    "calibrate_budget",
    "latency_cost_table",
    "GateStep",
    "gate_selection",
]


def freeze_backbone(model: DynamicNet) -> list[torch.nn.Parameter]:
    """Only the routing head trains (the slimming head, or the exit head); sliced BN stays in eval mode.

    Call after ``model.train()``. Returns the parameters to optimise.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.routing_head().parameters())
    for p in head:
        p.requires_grad_(True)
    for bn in model.sliced_batchnorms():
        bn.eval()
    return head


TASK_LOSSES = ("mixed", "routed", "expected")
SGS_TARGETS = ("sandwich", "cheapest")


@dataclass(frozen=True)
class GateObjective:
    """The stage II loss: ``sgs_weight * SGS + task_weight * task + complexity``.

    * ``task_loss``: how the classification loss reaches the gate.
      ``"mixed"`` (default) -- the negative log-likelihood of the mixture
      ``sum_j m_j * softmax(out_j)`` over every routing choice's output, ``m``
      the straight-through one-hot: the forward value is the chosen output's
      cross-entropy exactly, and every choice gets a gradient (what its
      probability of the label would do to the loss), so the gate learns
      *which* width would have been better, as the official zero-masking does
      in effect. Probabilities are mixed, not logits: a mixture of logits
      would favour whichever choice is most confident, right or wrong.
      ``"routed"`` -- the chosen output times its one-hot entry (the gate only
      learns "more or less of what was sampled"; kept to compare).
      ``"expected"`` [ours] -- ``sum_j softmax_j * CE(out_j)``, the expected
      loss under the gate's distribution (an exact, noise-free gradient; it
      averages losses, not outputs).
    * ``sgs_targets``: ``"cheapest"`` [ours, the default: chosen on held-out
      images over 3 seeds with the exit gate]: the cheapest choice that is
      right; or ``"sandwich"`` (the paper: slimmest and widest label each image).

    A model with ``router="utility"`` ignores all of this but nothing: its
    stage II loss is the utility head's binary cross-entropy (see the module
    docstring and :func:`utility_loss`).
    """

    tau: float = 1.0
    sgs_weight: float = 1.0
    task_weight: float = 1.0
    macs_weight: float = 0.5
    task_loss: str = "mixed"
    sgs_targets: str = "cheapest"

    def __post_init__(self) -> None:
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {', '.join(TASK_LOSSES)}, got {self.task_loss!r}")
        if self.sgs_targets not in SGS_TARGETS:
            raise ValueError(f"sgs_targets must be one of {', '.join(SGS_TARGETS)}, got {self.sgs_targets!r}")
        if not self.tau > 0:
            raise ValueError(f"tau (Gumbel-softmax temperature) must be positive, got {self.tau}")

    @classmethod
    def from_config(cls, gc: dict[str, Any]) -> GateObjective:
        """From the ``gate:`` section of a training config."""
        return cls(**{f.name: gc[f.name] for f in dataclasses.fields(cls)})


def mixed_task_loss(onehot: Tensor, outs: Tensor, labels: Tensor) -> Tensor:
    """``-log sum_j onehot_j * softmax(outs_j)[label]``, the batch mean: the NLL of the probability mixture.

    ``onehot`` (N, R) is the straight-through decision, ``outs`` (N, R, classes)
    every choice's logits. With a hard one-hot the forward value is the chosen
    output's cross-entropy; the gradient reaches every choice's weight.
    """
    log_p = F.log_softmax(outs.float(), dim=-1).gather(2, labels[:, None, None].expand(-1, outs.shape[1], 1))[..., 0]
    mixed = (onehot.to(log_p.dtype) * log_p.exp()).sum(1)
    return -mixed.clamp_min(torch.finfo(mixed.dtype).tiny).log().mean()


def utility_loss(head_out: Tensor, correct: Tensor) -> Tensor:
    """Binary cross-entropy of the utility head ``(N, R)`` against each choice's correctness ``(N, R)`` (bool)."""
    return F.binary_cross_entropy_with_logits(head_out.float(), correct.to(torch.float32))


def gate_step(
    model: DynamicNet,
    images: Tensor,
    labels: Tensor,
    macs_table: Tensor,
    objective: GateObjective,
    unit_macs: float,
    target_macs: float | None = None,
    amp: bool = False,
    cost_table: Tensor | None = None,
) -> dict[str, float]:
    """Losses of one stage II step, backward included (no optimiser step).

    The frozen backbone runs once up to the gate, then every routing choice's
    post-gate part on the whole batch, without gradient: they give the SGS
    targets and the outputs the task loss compares. ``macs_table`` is
    ``model.routing_macs``; ``target_macs`` the budget the complexity loss
    steers toward (None: plain ``(MACs / unit)^2``). ``cost_table`` (one value
    per routing choice, in MAC units) replaces ``macs_table`` in the complexity
    loss only: a latency budget's costs (:func:`latency_cost_table`).
    """
    space = model.routing_space
    with torch.no_grad(), autocast(images.device, amp):
        h, z = model.forward_pre(images, space[0])
        outs = torch.stack([model.forward_post(h, k).float() for k in space], dim=1)  # (N, R, classes)
    correct = outs.argmax(-1) == labels[:, None]
    if model.router == "utility":
        return _utility_step(model, h, z, outs, correct, macs_table)
    if objective.sgs_targets == "cheapest":
        target = cheapest_correct_targets(correct)
    else:
        target = sgs_targets(outs[:, 0], outs[:, -1], labels, len(space))
    # the stored budget bias is set after training, not trained through
    gate_logits, _ = model.raw_gate_logits(h, z, slim_out=outs[:, 0])
    gate_logits = gate_logits.float()
    onehot = straight_through_gumbel(gate_logits, objective.tau)
    choice = onehot.argmax(1)
    rows = torch.arange(len(labels), device=labels.device)
    if objective.task_loss == "mixed":
        task = mixed_task_loss(onehot, outs, labels)
    elif objective.task_loss == "routed":
        task = F.cross_entropy(outs[rows, choice] * onehot.gather(1, choice[:, None]), labels)
    else:
        per_choice = F.cross_entropy(outs.flatten(0, 1), labels.repeat_interleave(len(space)), reduction="none")
        task = (F.softmax(gate_logits / objective.tau, dim=1) * per_choice.view(-1, len(space))).sum(1).mean()
    sgs = F.cross_entropy(gate_logits, target)
    expected_macs = onehot @ macs_table.to(onehot.dtype)
    expected_cost = expected_macs if cost_table is None else onehot @ cost_table.to(onehot.device, onehot.dtype)
    cost = complexity_loss(expected_cost, objective.macs_weight, unit_macs, target_macs)
    loss = objective.sgs_weight * sgs + objective.task_weight * task + cost
    if not torch.isfinite(loss):
        raise FloatingPointError(f"stage II loss is not finite ({float(loss)}): sgs={float(sgs)} task={float(task)}")
    loss.backward()
    counts = torch.bincount(choice, minlength=len(space)).float() / len(labels)
    stats = {
        "loss": float(loss.detach()),
        "loss_sgs": float(sgs.detach()),
        "loss_task": float(task.detach()),
        "loss_macs": float(cost.detach()),
        "train_mmacs": float(expected_macs.detach().mean()) / 1e6,
        "train_top1": 100.0 * float(correct[rows, choice].float().mean()),
        "sgs_wide_frac": float((target == len(space) - 1).float().mean()),
    }
    stats.update({f"train_route_{k}": float(c) for k, c in zip(space, counts, strict=True)})
    return stats


def _utility_step(
    model: DynamicNet, h: Tensor, z: Tensor, outs: Tensor, correct: Tensor, macs_table: Tensor
) -> dict[str, float]:
    """Stage II of ``router="utility"``: the head learns each choice's P(correct), nothing else."""
    space = model.routing_space
    head_out, _ = model.raw_gate_logits(h, z, slim_out=outs[:, 0])
    loss = utility_loss(head_out, correct)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"stage II utility loss is not finite ({float(loss)})")
    loss.backward()
    choice = head_out.detach().argmax(1)  # knob 0: the choice most likely right
    rows = torch.arange(len(choice), device=choice.device)
    counts = torch.bincount(choice, minlength=len(space)).float() / len(choice)
    stats = {
        "loss": float(loss.detach()),
        "loss_utility": float(loss.detach()),
        "loss_sgs": 0.0,
        "loss_task": 0.0,
        "loss_macs": 0.0,
        "train_mmacs": float(macs_table[choice].float().mean()) / 1e6,
        "train_top1": 100.0 * float(correct[rows, choice].float().mean()),
        "train_utility_acc": float(((head_out.detach() > 0) == correct).float().mean()),
    }
    stats.update({f"train_route_{k}": float(c) for k, c in zip(space, counts, strict=True)})
    return stats


def target_macs_of(
    target_fraction: float | None, target_mmacs: float | None, model: DynamicNet, input_size: Sequence[int]
) -> float | None:
    """The budget in MACs per sample: ``target_mmacs``, or ``target_fraction`` of the widest routed sub-network
    (its MACs plus the routing head's). None when neither is set."""
    if target_mmacs is not None and target_fraction is not None:
        raise ValueError("gate.target_mmacs and gate.target_fraction are alternatives: set one")
    if target_mmacs is not None:
        if not target_mmacs > 0:
            raise ValueError(f"gate.target_mmacs must be positive, got {target_mmacs}")
        return target_mmacs * 1e6
    if target_fraction is not None:
        if not 0.0 < target_fraction <= 1.0:
            raise ValueError(f"gate.target_fraction must be in (0, 1], got {target_fraction}")
        return target_fraction * widest_routed_macs(model, input_size)
    return None


def widest_routed_macs(model: DynamicNet, input_size: Sequence[int]) -> float:
    """MACs per sample of the widest routing choice run as a static sub-network, routing head included.

    Budgets are fractions of this in both gate modes (in ``"exit"`` mode the
    widest *routing choice* costs more: it runs the slimmest first).
    """
    return float(model.subnet_macs(input_size)[model.routing_space[-1]] + model.gate_head_macs())


def latency_cost_table(macs_table: Tensor, choice_ms: Sequence[float], target_ms: float) -> tuple[Tensor, float]:
    """A latency budget in the complexity loss's units: each choice's ms scaled so the widest costs its MACs.

    Returns ``(cost_table, target)``: ``cost_j = ms_j * macs_widest / ms_widest`` and ``target_ms`` on the same
    scale, so ``gate.macs_weight`` and ``gate.macs_unit`` keep their meaning (the widest routed choice costs
    what it does in MACs; the others cost in proportion to their milliseconds).
    """
    ms = torch.as_tensor([float(v) for v in choice_ms], dtype=torch.float64)
    if ms.numel() != macs_table.numel():
        raise ValueError(f"need one ms per routing choice ({macs_table.numel()}), got {ms.numel()}")
    scale = float(macs_table[-1]) / float(ms[-1])
    return (ms * scale).to(torch.float32), float(target_ms) * scale


@torch.no_grad()
def calibrate_budget(
    model: DynamicNet,
    batches: Iterable,
    *,
    target_macs: float | None = None,
    target_fraction: float | None = None,
    target_ms: float | None = None,
    latency_table: LatencyTable | str | Path | Sequence[float] | None = None,
    batch_size: int | None = None,
    runtime: str | None = None,
    allow_foreign: bool = False,
    max_batches: int = 50,
) -> float:
    """Set the gate's stored budget bias so that dynamic inference averages a budget on ``batches``.

    The budget is ``target_macs`` per sample, ``target_fraction`` of the
    widest routed sub-network's MACs, or ``target_ms`` milliseconds per image
    of a ``latency_table`` (``dsnet bench --latency-table``; the row measured
    at ``batch_size`` in ``runtime``, see :meth:`dsnet.utils.latency.LatencyTable.row`;
    or one ms per routing choice as plain numbers), whose expected latency for
    a routing is ``sum_j share_j * ms_j``. A table measured on another machine,
    thread count, runtime or model is a ValueError naming the difference,
    unless ``allow_foreign`` (then one warning line). Use held-out training
    images (not the split you report on). The bias is ``b * model.bias_direction()``
    (the ramp of the logits router, the relative-cost vector of the utility
    router, where ``b`` is ``lam``; both favour slim choices for ``b > 0``) --
    the same knob whatever the budget's unit, only the cost that picks ``b``
    differs; the mean routed cost falls monotonically with ``b`` (for costs
    that grow along the routing space), so bisection finds the smallest ``b``
    that meets the budget, which is stored in ``model.gate.budget_bias``
    (saved with the weights). Returns ``b``.
    """
    given = [n for n, v in (("target_macs", target_macs), ("target_fraction", target_fraction),
                            ("target_ms", target_ms)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ValueError(
            "calibrate_budget needs exactly one of target_macs, target_fraction and target_ms"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if target_ms is not None and latency_table is None:
        raise ValueError("calibrate_budget(target_ms=...) needs latency_table= (dsnet bench --latency-table FILE)")
    if target_ms is not None and not target_ms > 0:
        raise ValueError(f"target_ms must be positive, got {target_ms}")
    device = next(model.parameters()).device
    logits, input_size = [], None
    with temporary_mode(model, False):
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            images = batch[0].to(device)
            input_size = tuple(images.shape[1:])
            h, z = model.forward_pre(images, model.routing_space[0])
            logits.append(model.gate_scores(h, z)[0].float())
    if not logits:
        raise ValueError("calibrate_budget: the batches yielded no images")
    if target_ms is not None:
        ms = choice_latencies(
            latency_table, model, input_size, batch_size=batch_size, runtime=runtime, allow_foreign=allow_foreign
        )
        table = torch.tensor(ms, dtype=torch.float64, device=device)
        target = float(target_ms)
    else:
        table = model.routing_macs(input_size).to(device)
        if target_fraction is not None:
            target_macs = target_macs_of(target_fraction, None, model, input_size)
        target = float(target_macs)
    g = torch.cat(logits)
    ramp = model.bias_direction(input_size).to(device)

    def mean_cost(b: float) -> float:
        return float(table[(g + b * ramp).argmax(1)].mean())

    lo, hi = -1.0, 1.0
    while mean_cost(lo) < target and lo > -1e6:
        lo *= 2
    while mean_cost(hi) > target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_cost(mid) > target:
            lo = mid
        else:
            hi = mid
    model.gate.budget_bias.copy_(hi * ramp)
    return hi


@torch.no_grad()
def evaluate_dynamic(model: DynamicNet, loader, device: torch.device, macs_table: Tensor) -> dict[str, float]:
    """Dynamic top-1 (%) and mean MACs per sample (eval mode: argmax, no noise)."""
    correct = total = 0
    macs = 0.0
    counts = torch.zeros(len(model.routing_space))
    with temporary_mode(model, False):
        for images, labels in loader:
            r = model(images.to(device), return_routing=True)
            correct += int((r.logits.argmax(1) == labels.to(device)).sum())
            total += labels.numel()
            macs += float(macs_table[r.choice].sum())
            counts += torch.bincount(r.choice.cpu(), minlength=len(model.routing_space)).float()
    out = {"top1": 100.0 * correct / max(1, total), "mmacs": macs / max(1, total) / 1e6}
    out.update({f"route_{k}": float(c) / max(1, total) for k, c in zip(model.routing_space, counts, strict=True)})
    return out


class GateStep:
    """One stage II optimiser step: :func:`gate_step` (losses, backward), the head's gradient averaged over DDP ranks
    (only the head trains, so no DistributedDataParallel wrapper), the optimiser step.

    Call it on a batch ``(images, labels)``; returns the step's statistics.
    """

    def __init__(
        self,
        model: DynamicNet,
        optimizer: torch.optim.Optimizer,
        macs_table: Tensor,
        objective: GateObjective,
        unit_macs: float,
        target_macs: float | None = None,
        *,
        amp: bool = False,
        cost_table: Tensor | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        self.model, self.optimizer, self.macs_table, self.objective = model, optimizer, macs_table, objective
        self.unit_macs, self.target_macs, self.amp, self.cost_table = unit_macs, target_macs, amp, cost_table
        self.ctx = ctx or DistContext()
        self.head = list(model.routing_head().parameters())
        self.device = next(model.parameters()).device

    def __call__(self, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        images, labels = batch
        self.optimizer.zero_grad(set_to_none=True)
        stats = gate_step(
            self.model,
            images.to(self.device),
            labels.to(self.device),
            self.macs_table,
            self.objective,
            self.unit_macs,
            self.target_macs,
            amp=self.amp,
            cost_table=self.cost_table,
        )
        if self.ctx.enabled:  # only the head trains: average its gradient by hand
            for p in self.head:
                dist.all_reduce(p.grad)
                p.grad /= self.ctx.world_size
        self.optimizer.step()
        return stats


def gate_selection(
    model: DynamicNet,
    record: dict[str, Any],
    *,
    loader: Iterable | None,
    split: str,
    macs_table: Tensor,
    budget_loader: Iterable | None = None,
    target_macs: float | None = None,
    target_ms: float | None = None,
    choice_ms: Sequence[float] | None = None,
    evaluate: bool = True,
) -> None:
    """What an epoch of stage II adds to its record: the budget calibrated, the gate on the selection split.

    With a ``budget_loader`` the stored budget bias is calibrated on it first
    (``target_ms`` against ``choice_ms``, else ``target_macs``), as inference
    will use it; then (``evaluate``: the main rank) dynamic top-1, MACs and
    routing mix on ``loader``, the keys named after ``split``
    (``holdout_top1``, ...), with the expected ms per image when ``choice_ms``
    is known.
    """
    if budget_loader is not None and target_ms is not None:
        record["budget_bias"] = calibrate_budget(model, budget_loader, target_ms=target_ms, latency_table=choice_ms)
        record["target_ms"] = target_ms
    elif budget_loader is not None and target_macs is not None:
        record["budget_bias"] = calibrate_budget(model, budget_loader, target_macs=target_macs)
        record["target_mmacs"] = target_macs / 1e6
    if evaluate and loader is not None:
        device = next(model.parameters()).device
        val = evaluate_dynamic(model, loader, device, macs_table)
        if choice_ms is not None:  # the expected ms per image of the gate's mix, from the table
            val["ms"] = sum(val[f"route_{k}"] * m for k, m in zip(model.routing_space, choice_ms))
        record.update({f"{split}_{k}": v for k, v in val.items()}, selection_split=split)  # holdout_top1, ...


def gate_epoch_line(record: dict[str, Any], split: str) -> str:
    """The epoch's log line after ``[gate] epoch e/E Ns``: losses, the selection split's top-1, MMACs (and ms)."""
    return (
        f"loss={record['loss']:.3f} "
        + (
            f"utility={record['loss_utility']:.3f} "
            if "loss_utility" in record
            else f"sgs={record['loss_sgs']:.3f} task={record['loss_task']:.3f} "
        )
        + f"{split}_top1={record.get(f'{split}_top1', float('nan')):.2f} "
        f"{split}_mmacs={record.get(f'{split}_mmacs', float('nan')):.2f}"
        + (f" {split}_ms={record[f'{split}_ms']:.4g}" if f"{split}_ms" in record else "")
    )


def with_gate_mode(model: DynamicNet, spec: dict[str, Any], device: torch.device) -> DynamicNet:
    """``model``'s weights in a model built from ``spec`` (another ``gate_mode`` or ``router``).

    Only an exit head can be new; a head kept from ``model`` keeps its weights.
    """
    from dsnet.models import create_model

    new = create_model(spec["name"], **spec["kwargs"]).to(device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    foreign = [k for k in missing if not k.startswith("exit_head.")] + [
        k for k in unexpected if not k.startswith("exit_head.")
    ]
    if foreign:
        raise ValueError(
            f"gate.mode={new.gate_mode!r}, gate.router={new.router!r}: the supernet's weights do not fit "
            f"({foreign[:5]})"
        )
    return new.eval()


def train_gate(
    cfg: dict | str | Path,
    supernet: str | Path,
    out: str | Path,
    resume: bool = False,
    overrides: list[str] | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run stage II on a (BN-recalibrated) supernet checkpoint. Returns the summary.

    ``stop_after_epoch`` as in :func:`dsnet.train.supernet.train_supernet`.
    """
    from dsnet.data import build_loader, check_class_names
    from dsnet.data.recipe import describe_recipe, with_recorded_recipe

    if not isinstance(cfg, dict):
        cfg = load_config(cfg, overrides)
    gc = cfg["gate"]
    ctx, device = init_distributed(cfg["device"], cfg["distributed"]["backend"])
    seed_everything(cfg["seed"] + 1)
    threads = set_threads(cfg.get("threads"), override=False)  # --threads N (set earlier) wins
    # a factory model the user's own recipe names may be built from the supernet checkpoint; no other
    model, sup = load_model(supernet, use_ema=True, map_location=device, trust_factories=[cfg["model"]["name"]])
    if not isinstance(model, DynamicNet):
        raise ValueError(f"{supernet} does not hold a dynamic dsnet model")
    spec = sup["model"]
    routing = {"gate_mode": gc["mode"], "router": gc["router"]}
    changed = {k: v for k, v in routing.items() if getattr(model, k) != v}
    if changed:  # the same supernet with another routing head or rule (an exit head is new)
        spec = {**spec, "kwargs": {**spec.get("kwargs", {}), **changed}}
        model = with_gate_mode(model, spec, device)
    if not sup.get("bn_calibrated", False) and ctx.is_main:
        print(f"warning: {supernet} has not been BN-recalibrated; run `dsnet calibrate-bn` first for best results")
    cfg = {**cfg, "data": with_recorded_recipe(cfg["data"], sup.get("dataset"))}  # the supernet's data recipe
    train_loader, info = build_loader(
        cfg["data"], "train", seed=cfg["seed"] + 1, rank=ctx.rank, world_size=ctx.world_size, device=device
    )
    if ctx.is_main:
        print(f"[gate] {describe_recipe(info.recipe, cfg['data']['augment'])}; torch threads: {threads}", flush=True)
    val_loader, val_split = selection_loader(cfg["data"], cfg["seed"], device)
    if ctx.is_main:
        print(f"[gate] data: {split_sizes(info.num_samples, val_loader, val_split)}", flush=True)
    if info.num_classes != model.num_classes or info.in_chans != model.in_chans:
        raise ValueError(
            f"data ({info.name}: {info.num_classes} classes, {info.in_chans} channels) does not match the supernet "
            f"({model.num_classes} classes, {model.in_chans} channels)"
        )
    check_class_names(sup.get("dataset"), info.class_names, str(supernet), f"{info.name} ({cfg['data'].get('root')})")
    run = RunDir(out, cfg, ctx, resume, "gate")
    model.train()
    head = freeze_backbone(model)
    input_size = (info.in_chans, info.image_size, info.image_size)
    macs_table = model.routing_macs(input_size).to(device)
    unit = 1e9 if gc["macs_unit"] == "gmacs" else widest_routed_macs(model, input_size)
    target = target_macs_of(gc["target_fraction"], gc["target_mmacs"], model, input_size)
    choice_ms, cost_table, loss_target = None, None, target
    if gc["latency_table"] is not None:  # ms per routing choice, checked to have been measured for this setting
        choice_ms = choice_latencies(
            gc["latency_table"],
            model,
            input_size,
            batch_size=gc["latency_batch_size"],
            runtime=gc["latency_runtime"],
            allow_foreign=gc["latency_table_foreign"],
        )
        if ctx.is_main:
            print(f"[gate] latency table {gc['latency_table']}: ms/image per routing choice "
                  + " ".join(f"{v:.4g}" for v in choice_ms), flush=True)  # fmt: skip
    if gc["target_ms"] is not None:
        if choice_ms is None:
            raise ValueError("gate.target_ms needs gate.latency_table (dsnet bench --latency-table FILE)")
        cost_table, loss_target = latency_cost_table(macs_table, choice_ms, gc["target_ms"])
    budgeted = target is not None or gc["target_ms"] is not None
    objective = GateObjective.from_config(gc)
    budget_loader = None
    if budgeted and val_split == "holdout":  # calibrate the budget bias on held-out training images
        budget_loader = val_loader
    elif budgeted:  # no holdout: a separate, fixed pass over (augmented) training images
        budget_loader, _ = build_loader(cfg["data"], "train", seed=cfg["seed"] + 7, device=device)
        budget_loader.sampler.set_epoch(0)
    global_batch = cfg["data"]["batch_size"] * ctx.world_size
    base_lr = effective_lr("gate", gc, global_batch, ctx.is_main)
    optimizer = MaskedSGD(head, base_lr, gc["momentum"], gc["weight_decay"], mask_untouched=False)
    step = GateStep(
        model, optimizer, macs_table, objective, unit, loss_target, amp=gc["amp"], cost_table=cost_table, ctx=ctx
    )

    def evaluate(epoch: int, record: dict[str, Any]) -> None:
        gate_selection(
            model,
            record,
            loader=val_loader,
            split=val_split,
            macs_table=macs_table,
            budget_loader=budget_loader,
            target_macs=target,
            target_ms=gc["target_ms"],
            choice_ms=choice_ms,
            evaluate=ctx.is_main,
        )

    loop = TrainLoop.for_run(
        run,
        ctx,
        device,
        stop_after_epoch,
        "gate",
        model,
        train_loader,
        optimizer,
        step,
        epochs=gc["epochs"],
        lr=base_lr,
        warmup_steps=round(gc["warmup_epochs"] * len(train_loader)),
        min_lr=gc["min_lr"],
        selection_key=f"{val_split}_top1",
        selection_split=val_split,
        begin_epoch=lambda epoch: freeze_backbone(model),
        evaluate=evaluate,
        payload=lambda epoch: {"state_dict": model.state_dict(), "ema_state_dict": None},
        checkpoint={
            "model": spec,
            "supernet": str(supernet),
            "dataset": dataclasses.asdict(info),
            "bn_calibrated": sup.get("bn_calibrated", False),
        },
        epoch_line=lambda epoch, record: gate_epoch_line(record, val_split),
    )
    loop.start(lambda state: load_state_into(model, state["state_dict"], run.last, state))
    fitted = loop.fit()
    if fitted.stopped_after_epoch is not None:
        return {"stopped_after_epoch": fitted.stopped_after_epoch}
    result = {
        "epochs": gc["epochs"],
        "best_metric": fitted.best_metric,
        "best_epoch": fitted.best_epoch,  # 1-based, as the logs count
        "selection_split": val_split,
    }
    run.write_summary(result)
    run.close()
    return result
