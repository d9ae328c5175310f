"""What a learned gate must beat, computed from the same evaluation pass (SPEC section 6.3).

Every function here works on per-sample records of one pass over the data:
``correct`` (N, R) says whether routing choice ``j``'s sub-network classifies
sample ``i`` correctly, ``costs`` (R,) are the choices' multiply-adds per
sample as static sub-networks, and ``confidence`` (N,) is the slimmest
choice's maximum softmax probability. No forward pass is needed, so every
baseline is exact for the data the gate was evaluated on.

* **Confidence cascade** [ours]: run the slimmest; if its confidence is below
  ``t``, run the widest too. The pre-gate part is shared, so an escalated
  sample costs ``slim + (wide - pre)``. No training; ``t`` sweeps the curve.
* **Oracle router**: each sample to the cheapest choice that gets it right
  (the slimmest when none does): the ceiling of any router over these
  sub-networks. Under a budget it upgrades the samples whose upgrade is
  cheapest first, which maximises the number of correct samples for that
  budget, so :func:`oracle_at` is the best accuracy any router can reach at a
  mean cost (:func:`oracle_curve` samples it for plots).
* **Random router**: each sample to choice ``j`` with probability ``p_j``
  (the gate's own routing mix): the floor. Its accuracy is reported as the
  expectation, ``sum_j p_j acc_j``, not one noisy draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "cascade_point",
    "cascade_curve",
    "cascade_thresholds",
    "oracle_curve",
    "oracle_at",
    "random_router",
    "pareto_envelope",
    "curve_at",
    "oracle_capture",
]


def cascade_point(
    correct: Tensor, confidence: Tensor, costs: Sequence[float], pre_macs: float, threshold: float
) -> dict[str, float]:
    """Accuracy and mean MACs of the slimmest -> widest cascade at one confidence threshold."""
    escalate = confidence < threshold
    right = torch.where(escalate, correct[:, -1], correct[:, 0])
    macs = float(costs[0]) + escalate.double() * (float(costs[-1]) - float(pre_macs))
    return {
        "threshold": float(threshold),
        "top1": 100.0 * right.double().mean().item(),
        "mean_macs": macs.mean().item(),
        "escalated": escalate.double().mean().item(),
    }


def cascade_thresholds(confidence: Tensor, num: int) -> list[float]:
    """``num`` thresholds from "never escalate" to "always escalate", spread by quantiles of the confidence."""
    if num < 2:
        raise ValueError(f"a cascade curve needs at least 2 thresholds, got {num}")
    c = confidence.double()
    inner = torch.quantile(c, torch.linspace(0, 1, num, dtype=torch.float64)[1:-1]).tolist()
    return sorted({0.0, *(float(t) for t in inner), float(c.max().item()) + 1e-6})


def cascade_curve(
    correct: Tensor, confidence: Tensor, costs: Sequence[float], pre_macs: float, num: int = 21
) -> list[dict[str, float]]:
    """The cascade at ``num`` thresholds (ascending threshold, hence ascending cost)."""
    return [cascade_point(correct, confidence, costs, pre_macs, t) for t in cascade_thresholds(confidence, num)]


def _upgrades(correct: Tensor, costs: Sequence[float]) -> tuple[Tensor, int]:
    """Extra cost of each sample's cheapest correct choice, over the slimmest (ascending), and the slimmest's hits."""
    cost = torch.as_tensor(costs, dtype=torch.float64)
    big = torch.finfo(torch.float64).max
    cheapest = torch.where(correct, cost.expand(correct.shape[0], -1), torch.tensor(big, dtype=torch.float64))
    best = cheapest.min(dim=1).values
    upgrade = (~correct[:, 0]) & (best < big)
    return torch.sort(best[upgrade] - cost[0]).values, int(correct[:, 0].sum())


def oracle_at(correct: Tensor, costs: Sequence[float], mean_macs: Sequence[float]) -> list[float]:
    """The oracle's exact top-1 (%) at each budget: as many cheapest upgrades as the budget pays for."""
    extra, base = _upgrades(correct, costs)
    n = max(1, correct.shape[0])
    spent = torch.cat([torch.zeros(1, dtype=torch.float64), extra.cumsum(0)])
    out = []
    for m in mean_macs:
        budget = (float(m) - float(costs[0])) * n
        out.append(100.0 * (base + int((spent <= budget + 1e-9 * max(1.0, abs(budget))).sum()) - 1) / n)
    return out


def oracle_curve(correct: Tensor, costs: Sequence[float], num: int = 21) -> list[dict[str, float]]:
    """The best accuracy any router over these choices reaches at each mean cost (ascending cost).

    Start with every sample on the slimmest choice; a sample the slimmest gets
    wrong but some choice gets right gains one correct answer for the extra cost
    of its cheapest correct choice. Taking the cheapest upgrades first is
    optimal for a mean-cost budget. The last point is the unconstrained oracle.
    """
    n = correct.shape[0]
    extra, base_correct = _upgrades(correct, costs)
    cost0 = float(costs[0])
    steps = sorted({round(float(q) * len(extra)) for q in np.linspace(0, 1, num)})
    points = []
    for m in steps:
        points.append(
            {
                "top1": 100.0 * (base_correct + m) / max(1, n),
                "mean_macs": cost0 + float(extra[:m].sum()) / max(1, n),
                "upgraded": m / max(1, n),
            }
        )
    return points


def random_router(correct: Tensor, costs: Sequence[float], mix: Sequence[float]) -> dict[str, float]:
    """Expected accuracy and cost of routing each sample to choice ``j`` with probability ``mix[j]``."""
    p = torch.as_tensor(mix, dtype=torch.float64)
    if p.numel() != correct.shape[1] or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"the mix needs one non-negative fraction per choice ({correct.shape[1]}), got {list(mix)}")
    p = p / p.sum()
    acc = correct.double().mean(dim=0)
    return {
        "top1": 100.0 * float((p * acc).sum()),
        "mean_macs": float((p * torch.as_tensor(costs, dtype=torch.float64)).sum()),
        "mix": p.tolist(),
    }


def pareto_envelope(points: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(MACs, top-1) of the points no other point beats at equal or lower cost, ascending MACs.

    Choosing a threshold for a budget means taking the best point that fits
    it, so a curve's envelope, not its raw points, is what another method is
    held to.
    """
    xs, ys = [], []
    for p in sorted(points, key=lambda p: (p["mean_macs"], -p["top1"])):
        if not ys or p["top1"] > ys[-1]:
            xs.append(float(p["mean_macs"]))
            ys.append(float(p["top1"]))
    return xs, ys


def curve_at(curve: tuple[Sequence[float], Sequence[float]], macs: float) -> float:
    """A piecewise-linear curve's top-1 at ``macs`` (clamped at its ends)."""
    xs, ys = curve
    return float(np.interp(macs, xs, ys))


def oracle_capture(top1: float, static_top1: float, oracle_top1: float) -> float | None:
    """Share of the oracle's gain over the static curve that a router captures, at the router's MACs.

    ``(top1 - static) / (oracle - static)``: 0 is no better than the static
    sub-networks, 1 is the oracle. None when the oracle has no gain there.
    """
    headroom = oracle_top1 - static_top1
    if headroom <= 1e-9:
        return None
    return (top1 - static_top1) / headroom
