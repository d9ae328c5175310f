"""Evaluation of a dynamic supernet: static sub-networks, dynamic routing, budget sweep.

Why one pass suffices for the whole budget sweep
------------------------------------------------
Dynamic inference sends each sample through the routing choice its gate picks,
and that choice's output *is* the output of the static sub-network of the
same index (the same layers, weights and statistics slots). So one pass over
the data that records, per sample,

* the gate logits (bias-free) and
* whether each routing-space sub-network classifies the sample correctly,

determines the accuracy and cost of dynamic inference at *every* gate bias by
arithmetic: ``choice = argmax(gate_logits + b * ramp)``, then look up that
choice's correctness and MACs. A 21-point sweep costs no more forward passes
than a single evaluation. The real dynamic forward runs too (once, at b=0) and
is checked against the arithmetic, since they must agree.

The bias ramp is ``linspace(+1, -1, R)`` over the ``R`` routing choices
(slimmest first): ``b = 0`` is the trained gate, ``b > 0`` moves samples to
slimmer choices, ``b < 0`` to wider ones. ``model(x, gate_bias=b * ramp)``
reproduces any sweep point.

Report schema (``SCHEMA_VERSION = 2``), a JSON-serialisable dict
---------------------------------------------------------------
Accuracies are percentages (0-100); MACs are multiply-adds per sample; the
histograms are indexed by routing choice (position in ``routing_space``).

.. code-block:: text

    schema_version  int
    model           {name: str, num_classes: int, routing_space: [int], gate_head_macs: int,
                     budget_bias: [float] * R  (the gate's stored bias, set by stage II's budget calibration)}
    dataset         {name: str, split: str, num_samples: int, class_names: [str]}
    input_size      [C, H, W]
    top5_k          int  (min(5, num_classes): the k of the "top5" fields)
    bias_ramp       [float] * R  (gate bias vector = bias * bias_ramp: model.bias_direction(), the
                     linspace(+1, -1, R) ramp for router "logits", -(c - mean(c)) of the relative MACs for "utility")
    routing         {router, direction: [float] * R, reachable_fraction: [float] * R  (share of images each
                     choice wins at SOME bias, exactly), mean_reachable_choices, num_samples}
                     (see dsnet.evaluation.reachability)
    gate_mode       "pre" | "exit"
    routing_choices [{choice: int, subnet: int, macs: int}] * R  (macs: what routing to the choice costs,
                     gate head included; in "exit" mode the slimmest plus the choice's post-gate part)
    static          [{index, widths: {stage: int}, macs: int, top1, top5, routed: bool,
                      in_routing_space: bool}]  (every sub-network; routed=False: training-only largest;
                      kernels: {stage: int} too for families that slice kernel sizes)
    dynamic         {bias: 0.0, top1, top5, mean_macs: float,
                     histogram: {counts: [int] * R, fractions: [float] * R},
                     per_class: [{class: int, name: str, count: int, histogram: {counts, fractions}}]}
    sweep           [{bias, top1, top5, mean_macs, histogram: {counts, fractions},
                      static_top1_at_macs, cascade_top1_at_macs, oracle_top1_at_macs}]  (ascending bias;
                     the last three: each baseline at the point's own mean MACs)
    baselines       {pre_gate_macs: float,
                     cascade: [{threshold, top1, mean_macs, escalated}]  (slimmest, then the widest when the
                              slimmest's max softmax < threshold; ascending threshold),
                     oracle: [{top1, mean_macs, upgraded}]  (best accuracy any router reaches per mean MACs),
                     random: {top1, mean_macs, mix}  (expected, with the gate's b=0 routing mix)}
                     (see dsnet.evaluation.baselines; cascade and oracle are compared through their Pareto
                     envelopes)
    summary         {widest_routed: {index, macs, top1}, dynamic_top1, dynamic_mean_macs,
                     mac_reduction: float  (widest routed MACs / dynamic mean MACs),
                     static_top1_at_dynamic_macs: float  (routed static curve, linearly interpolated),
                     top1_gain_at_equal_macs: float  (dynamic top1 minus the above),
                     interpolation_clamped: bool  (dynamic MACs outside the routed static range),
                     cascade_top1_at_dynamic_macs, gain_over_cascade, oracle_top1_at_dynamic_macs,
                     oracle_capture: float | null  (share of the oracle's gain over the static curve the gate
                     captures at its MACs), random_router: {top1, mean_macs, mix},
                     sweep_min_gain_over_static, sweep_min_gain_over_cascade: float | null  (worst sweep point
                     inside the static range, among those routing to more than one sub-network)}
    consistency     {top1_mismatches: int  (samples where the dynamic forward and the arithmetic disagree),
                     max_rel_logit_diff: float  (largest |dynamic - static| logit, over max(1, |logit|))}
    95% intervals   every top-1 above has a ``top1_pm95`` beside it (static entries, dynamic, sweep points,
                    summary.widest_routed; summary.dynamic_top1_pm95): the half-width, in points, of its Wilson
                    interval on the n images. Every margin has one too: sweep points' gain_over_static_pm95 and
                    gain_over_cascade_pm95 (their top1 minus static/cascade_top1_at_macs), summary's
                    top1_gain_at_equal_macs_pm95, gain_over_cascade_pm95, sweep_min_gain_over_*_pm95: paired
                    intervals from per-image correctness, the interpolated baseline's vector mixed between the
                    bracketing curve points (approximate: see ``_add_intervals``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dsnet.evaluation import baselines as bl
from dsnet.evaluation import stats
from dsnet.evaluation.reachability import reachability_summary
from dsnet.layers.gate import bias_ramp
from dsnet.models.base import DynamicNet
from dsnet.utils.modes import temporary_mode

__all__ = ["SCHEMA_VERSION", "evaluate", "bias_ramp", "auto_biases", "sweep_point", "routed_curve"]

SCHEMA_VERSION = 2

# Dynamic and static logits of the same sub-network differ only by float rounding (group batch sizes,
# TF32 on GPUs). Anything beyond this fraction of the logit scale means the two paths compute different things.
_LOGIT_TOLERANCE = 0.05


def sweep_point(
    gate_logits: Tensor, correct1: Tensor, correct5: Tensor, choice_macs: Tensor, bias: float, ramp: Tensor
) -> tuple[dict[str, Any], Tensor]:
    """Accuracy, mean MACs and histogram of dynamic inference at one bias, without a forward pass.

    ``gate_logits`` (N, R) are bias-free; ``correct1``/``correct5`` (N, R) say
    whether each routing choice's sub-network gets each sample right. Returns
    the point and the per-sample choices.
    """
    n, r = gate_logits.shape
    biased = gate_logits + (ramp.to(gate_logits.dtype) * bias)  # float32, as model.route adds it
    choice = biased.argmax(dim=1)
    rows = torch.arange(n)
    counts = torch.bincount(choice, minlength=r)
    point = {
        "bias": float(bias),
        "top1": 100.0 * correct1[rows, choice].double().mean().item(),
        "top5": 100.0 * correct5[rows, choice].double().mean().item(),
        "mean_macs": choice_macs.double()[choice].mean().item(),
        "histogram": _histogram(counts),
    }
    return point, choice


def auto_biases(gate_logits: Tensor, ramp: Tensor, num: int) -> list[float]:
    """``num`` biases spanning "every sample on the widest choice" to "every sample on the slimmest".

    Each sample switches to the slimmest choice above one bias and to the widest
    below another (both computed exactly from its gate logits); the sweep takes
    evenly spaced quantiles of those thresholds, so the points spread over the
    range where routing actually changes rather than over empty stretches,
    pushes the endpoints just past the extremes, and always includes 0.
    """
    if num < 1:
        raise ValueError(f"--sweep needs at least one point, got {num}")
    r = gate_logits.shape[1]
    if r == 1 or gate_logits.shape[0] == 0 or num == 1:
        return [0.0]
    g = gate_logits.double()
    ramp = ramp.double()
    # choice 0 wins once b >= (g_j - g_0) / (r_0 - r_j) for every j > 0
    slim = ((g[:, 1:] - g[:, :1]) / (ramp[0] - ramp[1:])).max(dim=1).values
    # choice R-1 wins while b <= (g_last - g_j) / (r_j - r_last) for every j < R-1
    wide = ((g[:, -1:] - g[:, :-1]) / (ramp[:-1] - ramp[-1])).min(dim=1).values
    thresholds = torch.cat([slim, wide])
    lo, hi = thresholds.min().item(), thresholds.max().item()
    margin = 1e-3 * (hi - lo) + 1e-6 * max(1.0, abs(lo), abs(hi))
    values = torch.quantile(thresholds, torch.linspace(0, 1, num, dtype=torch.float64)).tolist()
    values[0], values[-1] = lo - margin, hi + margin
    return sorted({float(v) for v in values} | {0.0})


def routed_curve(static: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(MACs, top-1) of the routed static sub-networks, ascending MACs: the curve dynamic routing must beat."""
    points = sorted((s["macs"], s["top1"]) for s in static if s["routed"])
    return [float(m) for m, _ in points], [float(a) for _, a in points]


def _histogram(counts: Tensor) -> dict[str, list]:
    total = int(counts.sum())
    values = [int(c) for c in counts.tolist()]
    return {"counts": values, "fractions": [c / total if total else 0.0 for c in values]}


def _topk_correct(logits: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return hit[:, 0], hit.any(dim=1)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError("the loader must yield (images, labels) batches")
    return batch[0], batch[1]


@torch.inference_mode()
def _collect(model: DynamicNet, loader: Iterable, device: torch.device, k5: int, progress: bool) -> dict[str, Any]:
    """The single pass over the data: per-batch forwards, small per-sample records kept on the CPU."""
    routing_space = model.routing_space
    routed = [s.index for s in model.subnets if s.routed]
    unrouted = [s.index for s in model.subnets if not s.routed]
    pos_in_space = {k: j for j, k in enumerate(routing_space)}
    num = len(model.subnets)
    static1 = torch.zeros(num, dtype=torch.int64)
    static5 = torch.zeros(num, dtype=torch.int64)
    keys = ("gate", "labels", "c1", "c5", "dyn1", "dyn5", "choice", "conf", "routed1")
    rec: dict[str, list[Tensor]] = {k: [] for k in keys}  # routed1: (N, routed) per-image top-1 hits
    max_diff, input_size = 0.0, None

    batches = loader
    if progress:
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        batches = tqdm(loader, total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for batch in batches:
        x, y = _split_batch(batch)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        if x.shape[0] == 0:
            continue
        if input_size is None:
            input_size = tuple(int(s) for s in x.shape[1:])
        elif tuple(x.shape[1:]) != input_size:
            raise ValueError(f"every batch must have images of one size: got {tuple(x.shape[1:])} after {input_size}")
        # dynamic inference, exactly as deployed
        dyn = model(x, return_routing=True)
        d1, d5 = _topk_correct(dyn.logits, y, k5)
        # every routed sub-network shares the pre-gate part (the same widths and statistics slots; dynamic
        # inference relies on it too), so run it once and each post-gate part on the whole batch
        h, _ = model.forward_pre(x, routing_space[0])
        c1 = torch.empty(x.shape[0], len(routing_space), dtype=torch.bool, device=device)
        c5 = torch.empty_like(c1)
        expected = torch.empty_like(dyn.logits)
        conf = None
        routed1 = torch.empty(x.shape[0], len(routed), dtype=torch.bool, device=device)
        for i, k in enumerate(routed):
            logits = model.forward_post(h, k)
            hit1, hit5 = _topk_correct(logits, y, k5)
            routed1[:, i] = hit1
            static1[k] += int(hit1.sum())
            static5[k] += int(hit5.sum())
            if k in pos_in_space:
                j = pos_in_space[k]
                c1[:, j], c5[:, j] = hit1, hit5
                if j == 0:  # the slimmest choice's confidence, what a cascade thresholds
                    conf = torch.softmax(logits.float(), dim=1).max(dim=1).values
                mask = dyn.choice == j
                expected[mask] = logits[mask]
        for k in unrouted:  # the training-only largest has wider pre-gate stages: a full forward of its own
            hit1, hit5 = _topk_correct(model(x, subnet=k), y, k5)
            static1[k] += int(hit1.sum())
            static5[k] += int(hit5.sum())
        scale = max(1.0, expected.abs().max().item())
        max_diff = max(max_diff, (dyn.logits - expected).abs().max().item() / scale)
        for key, value in (
            ("gate", dyn.gate_logits.float()),
            ("labels", y),
            ("c1", c1),
            ("c5", c5),
            ("dyn1", d1),
            ("dyn5", d5),
            ("choice", dyn.choice),
            ("conf", conf),
            ("routed1", routed1),
        ):
            rec[key].append(value.cpu())
    if input_size is None:
        raise ValueError("the data loader yielded no samples")
    out: dict[str, Any] = {k: torch.cat(v) for k, v in rec.items()}
    out.update(static1=static1, static5=static5, max_diff=max_diff, input_size=input_size)
    return out


def _min_gain(points: Sequence[dict[str, Any]], key: str, curve_macs: Sequence[float]) -> float | None:
    """The smallest margin of a sweep point over a baseline, among points inside the routed static range.

    Points that route every sample to one sub-network are left out: they *are*
    a static point (margin 0 by construction), not a routing decision.
    """
    inside = [
        p["top1"] - p[key]
        for p in points
        if curve_macs[0] <= p["mean_macs"] <= curve_macs[-1] and sum(f > 0 for f in p["histogram"]["fractions"]) > 1
    ]
    return min(inside) if inside else None


def _add_intervals(
    static: list[dict[str, Any]],
    dynamic: dict[str, Any],
    points: list[dict[str, Any]],
    summary: dict[str, Any],
    cascade: list[dict[str, Any]],
    rec: dict[str, Any],
    gate: Tensor,
    choice_macs: Tensor,
    ramp: Tensor,
) -> None:
    """Add a 95% ``+-`` (``*_pm95``, points) to every top-1 and every margin of the report, in place.

    Top-1s: the Wilson interval on the ``n`` images (:func:`dsnet.evaluation.stats.top1_interval`).
    Margins over the static curve and the cascade at a point's mean MACs: the paired interval
    (:func:`dsnet.evaluation.stats.paired_difference`) of the point's per-image correctness minus the
    baseline's per-image correctness *interpolated* between the two curve points bracketing those MACs
    (their vectors mixed with the interpolation weights). That is approximate: the weight depends on the
    measured mean MACs, which is itself random, and is treated as fixed.
    """
    n = int(rec["labels"].numel())
    c1 = rec["c1"]
    for s in static:
        s["top1_pm95"] = stats.top1_interval(int(rec["static1"][s["index"]]), n).half_width
    dynamic["top1_pm95"] = stats.top1_interval(int(rec["dyn1"].sum()), n).half_width
    order = [s["index"] for s in static if s["routed"]]  # the columns of rec["routed1"]
    routed = sorted((s for s in static if s["routed"]), key=lambda s: s["macs"])
    static_macs = [float(s["macs"]) for s in routed]
    static_vectors = [rec["routed1"][:, order.index(s["index"])] for s in routed]
    env_macs, env_top1 = bl.pareto_envelope(cascade)
    by_value = {(float(c["mean_macs"]), float(c["top1"])): float(c["threshold"]) for c in cascade}
    conf = rec["conf"]
    cascade_vectors = [
        torch.where(conf < by_value[(m, a)], c1[:, -1], c1[:, 0]) for m, a in zip(env_macs, env_top1, strict=True)
    ]

    def margins(right: Tensor, macs: float) -> tuple[float, float]:
        static_ref = stats.interpolated_correctness(static_macs, static_vectors, macs)
        cascade_ref = stats.interpolated_correctness(env_macs, cascade_vectors, macs)
        over_static = stats.paired_difference(right, static_ref)
        over_cascade = stats.paired_difference(right, cascade_ref)
        return over_static.half_width, over_cascade.half_width

    rows = torch.arange(n)
    for p in points:
        _, choice = sweep_point(gate, c1, rec["c5"], choice_macs, p["bias"], ramp)
        right = c1[rows, choice]
        p["top1_pm95"] = stats.top1_interval(int(right.sum()), n).half_width
        p["gain_over_static_pm95"], p["gain_over_cascade_pm95"] = margins(right, p["mean_macs"])
    summary["widest_routed"]["top1_pm95"] = next(
        s["top1_pm95"] for s in static if s["index"] == summary["widest_routed"]["index"]
    )
    summary["dynamic_top1_pm95"] = dynamic["top1_pm95"]
    summary["top1_gain_at_equal_macs_pm95"], summary["gain_over_cascade_pm95"] = margins(
        rec["dyn1"], dynamic["mean_macs"]
    )
    for key, pm in (
        ("sweep_min_gain_over_static", "gain_over_static_pm95"),
        ("sweep_min_gain_over_cascade", "gain_over_cascade_pm95"),
    ):
        value = summary[key]
        base = "static_top1_at_macs" if key.endswith("static") else "cascade_top1_at_macs"
        worst = [p for p in points if value is not None and p["top1"] - p[base] == value]
        summary[f"{key}_pm95"] = worst[0][pm] if worst else None


def evaluate(
    model: DynamicNet,
    loader: Iterable,
    *,
    biases: Sequence[float] | None = None,
    sweep: int = 21,
    cascade_points: int = 21,
    device: str | torch.device = "cpu",
    progress: bool = True,
    model_name: str | None = None,
    dataset_name: str = "unknown",
    class_names: Sequence[str] | None = None,
    split: str = "val",
) -> dict[str, Any]:
    """Evaluate every static sub-network, dynamic inference and a gate-bias sweep in one pass.

    ``loader`` yields ``(images, labels)`` batches. ``biases`` are the sweep's
    scalar biases (0 is always added); without them, ``sweep`` points are
    chosen from the gate's own logits (:func:`auto_biases`). Returns the report
    described in this module's docstring. The model is left in the mode it was
    in.
    """
    if not isinstance(model, DynamicNet):
        raise TypeError(f"evaluate needs a dynamic dsnet model, got {type(model).__name__}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    k5 = min(5, model.num_classes)
    with temporary_mode(model.to(device), False):  # restores every module's own flag (frozen BN stays frozen)
        rec = _collect(model, loader, device, k5, progress)

    if rec["max_diff"] > _LOGIT_TOLERANCE:
        raise RuntimeError(
            f"dynamic inference and the static sub-networks disagree (relative logit difference "
            f"{rec['max_diff']:.3g}): the model breaks the shared pre-gate contract of DynamicNet"
        )
    input_size = rec["input_size"]
    macs = model.subnet_macs(input_size)
    routing_space = list(model.routing_space)
    gate_head = int(model.gate_head_macs())
    choice_macs = model.routing_macs(input_size).double()
    n = int(rec["labels"].numel())
    ramp = model.bias_direction(input_size)  # the knob's direction: bias_ramp for router "logits"
    gate, c1, c5 = rec["gate"], rec["c1"], rec["c5"]

    static = [
        {
            "index": s.index,
            "widths": s.as_dict(),
            **({} if s.kernels is None else {"kernels": s.kernel_dict()}),  # families that slice kernel sizes
            "macs": int(macs[s.index]),
            "top1": 100.0 * int(rec["static1"][s.index]) / n,
            "top5": 100.0 * int(rec["static5"][s.index]) / n,
            "routed": bool(s.routed),
            "in_routing_space": s.index in routing_space,
        }
        for s in model.subnets
    ]

    # b = 0 by arithmetic, checked against the real dynamic forward
    zero, zero_choice = sweep_point(gate, c1, c5, choice_macs, 0.0, ramp)
    mismatches = int((c1[torch.arange(n), zero_choice] != rec["dyn1"]).sum())
    if not torch.equal(zero_choice, rec["choice"]):
        raise RuntimeError("the gate's argmax differs from the dynamic forward's routing choice")
    if mismatches:
        warnings.warn(
            f"{mismatches} of {n} samples: the dynamic forward's top-1 differs from its static sub-network's "
            f"(float rounding at a near-tie)",
            stacklevel=2,
        )

    names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise ValueError(f"{len(names)} class names for a model with {model.num_classes} classes")
    labels = rec["labels"]
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"labels outside 0..{model.num_classes - 1}: does the data match the model?")
    r = len(routing_space)
    per_class_counts = torch.bincount(labels * r + zero_choice, minlength=model.num_classes * r).view(-1, r)
    per_class = [
        {"class": c, "name": names[c], "count": int(row.sum()), "histogram": _histogram(row)}
        for c, row in enumerate(per_class_counts)
    ]
    dynamic = {
        "bias": 0.0,
        "top1": 100.0 * rec["dyn1"].double().mean().item(),
        "top5": 100.0 * rec["dyn5"].double().mean().item(),
        "mean_macs": zero["mean_macs"],
        "histogram": zero["histogram"],
        "per_class": per_class,
    }

    values = auto_biases(gate, ramp, sweep) if biases is None else sorted({float(b) for b in biases} | {0.0})
    if any(not math.isfinite(b) for b in values):
        raise ValueError(f"biases must be finite numbers, got {values}")
    points = [zero if b == 0.0 else sweep_point(gate, c1, c5, choice_macs, b, ramp)[0] for b in values]

    curve_macs, curve_top1 = routed_curve(static)
    widest = max((s for s in static if s["routed"]), key=lambda s: s["macs"])
    static_costs = [float(macs[k]) for k in routing_space]
    pre_macs = float(model.pre_gate_macs(input_size))
    baselines = {
        "pre_gate_macs": pre_macs,
        "cascade": bl.cascade_curve(c1, rec["conf"], static_costs, pre_macs, num=cascade_points),
        "oracle": bl.oracle_curve(c1, static_costs),
        "random": bl.random_router(c1, static_costs, dynamic["histogram"]["fractions"]),
    }
    cascade_env = bl.pareto_envelope(baselines["cascade"])
    oracle = bl.oracle_at(c1, static_costs, [p["mean_macs"] for p in points] + [dynamic["mean_macs"]])
    for point, oracle_top1 in zip(points, oracle):  # every sweep point against the baselines at its own MACs
        point["static_top1_at_macs"] = float(np.interp(point["mean_macs"], curve_macs, curve_top1))
        point["cascade_top1_at_macs"] = bl.curve_at(cascade_env, point["mean_macs"])
        point["oracle_top1_at_macs"] = oracle_top1
    at_equal = float(np.interp(dynamic["mean_macs"], curve_macs, curve_top1))
    cascade_at = bl.curve_at(cascade_env, dynamic["mean_macs"])
    oracle_at = oracle[-1]
    summary = {
        "widest_routed": {"index": widest["index"], "macs": widest["macs"], "top1": widest["top1"]},
        "dynamic_top1": dynamic["top1"],
        "dynamic_mean_macs": dynamic["mean_macs"],
        "mac_reduction": widest["macs"] / dynamic["mean_macs"],
        "static_top1_at_dynamic_macs": at_equal,
        "top1_gain_at_equal_macs": dynamic["top1"] - at_equal,
        "interpolation_clamped": not curve_macs[0] <= dynamic["mean_macs"] <= curve_macs[-1],
        "cascade_top1_at_dynamic_macs": cascade_at,
        "gain_over_cascade": dynamic["top1"] - cascade_at,
        "oracle_top1_at_dynamic_macs": oracle_at,
        "oracle_capture": bl.oracle_capture(dynamic["top1"], at_equal, oracle_at),
        "random_router": baselines["random"],
        "sweep_min_gain_over_static": _min_gain(points, "static_top1_at_macs", curve_macs),
        "sweep_min_gain_over_cascade": _min_gain(points, "cascade_top1_at_macs", curve_macs),
    }
    _add_intervals(static, dynamic, points, summary, baselines["cascade"], rec, gate, choice_macs, ramp)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": model_name or type(model).__name__,
            "num_classes": int(model.num_classes),
            "routing_space": routing_space,
            "gate_head_macs": gate_head,
            "budget_bias": [float(b) for b in model.gate.budget_bias],
        },
        "dataset": {"name": dataset_name, "split": split, "num_samples": n, "class_names": names},
        "input_size": list(input_size),
        "top5_k": k5,
        "bias_ramp": ramp.tolist(),
        "routing_choices": [
            {"choice": j, "subnet": k, "macs": int(choice_macs[j])} for j, k in enumerate(routing_space)
        ],
        "gate_mode": model.gate_mode,
        "routing": reachability_summary(gate, ramp, model.router),
        "static": static,
        "dynamic": dynamic,
        "sweep": points,
        "baselines": baselines,
        "summary": summary,
        "consistency": {"top1_mismatches": mismatches, "max_rel_logit_diff": rec["max_diff"]},
    }
