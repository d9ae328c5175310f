"""How sure a top-1 is: 95% intervals for an accuracy on ``n`` images, and for the difference of two methods.

* :func:`top1_interval`: the **Wilson score interval** of a proportion (``k``
  right out of ``n``). Unlike the normal approximation it stays inside
  [0, 100] and is not zero-width at 0% or 100%. On 1,000 images a top-1 near
  50% is about +-3.1 points, near 90% about +-1.9.
* :func:`paired_difference`: the difference of two methods evaluated **on
  the same images**, from the per-image correctness (1/0, or a weighted mix
  of such vectors for an interpolated curve): the normal interval of the mean
  of the per-image differences, ``z * std(d) / sqrt(n)`` (McNemar-style: only
  the images on which the methods disagree contribute). It is much tighter
  than combining two unpaired intervals, since both methods get the same easy
  and hard images.
* :func:`interpolated_correctness`: the per-image "correctness" of a
  piecewise-linear accuracy curve at some MACs (the two bracketing points'
  vectors mixed with the interpolation weights), so a margin over an
  interpolated baseline gets a paired interval too. It treats the
  interpolation weight as fixed (it depends on the measured mean MACs, itself
  random): an approximation.

Half-widths (the ``+-`` printed) are in accuracy points (0-100 scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Interval", "Z95", "top1_interval", "paired_difference", "interpolated_correctness"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    """An estimate with a confidence interval, in points (0-100 for accuracies)."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width: the ``+-`` to print."""
        return 0.5 * (self.high - self.low)

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "pm": self.half_width}


def top1_interval(correct: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of a top-1 of ``correct`` out of ``n`` images (percent)."""
    if n <= 0:
        raise ValueError(f"an accuracy interval needs at least one image, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return Interval(100.0 * p, 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def paired_difference(a: Tensor, b: Tensor, z: float = Z95) -> Interval:
    """Mean of ``a - b`` over the same images, with its paired normal interval (points).

    ``a`` and ``b`` are per-image correctness, (N,) each: booleans, 0/1, or
    a mix of such vectors in [0, 1] (:func:`interpolated_correctness`).
    Identical vectors give ``0 +- 0``.
    """
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    if a.numel() != b.numel():
        raise ValueError(f"a paired difference needs both methods on the same images: {a.numel()} vs {b.numel()}")
    n = a.numel()
    if n == 0:
        raise ValueError("a paired difference needs at least one image")
    d = 100.0 * (a - b)
    mean = float(d.mean())
    std = float(d.std(unbiased=True)) if n > 1 else 0.0
    half = z * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def interpolated_correctness(macs: Sequence[float], correct: Sequence[Tensor], at: float) -> Tensor:
    """Per-image correctness of the piecewise-linear curve through ``(macs[i], mean(correct[i]))`` at ``at``.

    ``macs`` ascending; clamped at the ends (like ``numpy.interp``). Its mean
    is exactly the curve's top-1 there (as a fraction).
    """
    if len(macs) != len(correct) or not macs:
        raise ValueError("interpolated_correctness needs one correctness vector per curve point")
    xs = [float(m) for m in macs]
    if at <= xs[0]:
        return correct[0].double()
    if at >= xs[-1]:
        return correct[-1].double()
    j = next(i for i in range(1, len(xs)) if xs[i] >= at)
    span = xs[j] - xs[j - 1]
    w = 1.0 if span <= 0 else (at - xs[j - 1]) / span
    return (1.0 - w) * correct[j - 1].double() + w * correct[j].double()
