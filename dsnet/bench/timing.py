"""Interleaved timing: every method runs once per round, in rotating order.

Machine noise (other processes, frequency changes, thermal drift) comes in
bursts. Timing method A for a minute and then method B for a minute puts a
burst on one side of the comparison; running them round-robin spreads it over
all of them, so the *ratios* between methods stay trustworthy even when the
absolute numbers are noisy. Medians and inter-quartile ranges are reported
because a few interrupted repetitions should not move the result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

__all__ = ["Stats", "SpeedupClaim", "MIN_ROUNDS_TO_CLAIM", "summarize", "speedup_claim", "time_once", "interleaved"]

MIN_ROUNDS_TO_CLAIM = 5


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in milliseconds."""

    median: float
    q1: float
    q3: float
    iqr: float
    mean: float
    min: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_ms: list[float]) -> Stats:
    """Median, quartiles and IQR of a list of timings (ms)."""
    if not samples_ms:
        raise ValueError("no timings to summarize")
    xs = sorted(samples_ms)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return Stats(statistics.median(xs), q1, q3, q3 - q1, statistics.fmean(xs), xs[0], len(xs))


@dataclass(frozen=True)
class SpeedupClaim:
    """A speed-up of one method over a reference, measured in the same interleaved rounds, and whether it holds.

    ``speedup`` = median(reference) / median(method), as headlined.
    ``ratio_q1``/``ratio_q3``: quartiles of the per-round ratios
    reference_r / method_r. The rule: a speed-up (or slow-down) is **clear**
    when at least ``MIN_ROUNDS_TO_CLAIM`` rounds were timed and both quartiles
    of the per-round ratios lie on the same side of 1, i.e. at least three
    rounds in four agree on which method was faster. Otherwise it is **too
    noisy to claim**. Pairing by round is what interleaving buys: a burst of
    machine noise slows both methods of a round, so it cancels in the ratio.
    """

    speedup: float
    ratio_q1: float
    ratio_q3: float
    rounds: int
    clear: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def speedup_claim(reference_ms: list[float], method_ms: list[float]) -> SpeedupClaim:
    """``reference``'s time over ``method``'s, per interleaved round and overall, with the noise rule applied."""
    if len(reference_ms) != len(method_ms) or not reference_ms:
        raise ValueError(f"need the same, non-zero number of rounds, got {len(reference_ms)} and {len(method_ms)}")
    ratios = summarize([r / m for r, m in zip(reference_ms, method_ms)])
    speedup = statistics.median(reference_ms) / statistics.median(method_ms)
    same_side = ratios.q1 > 1.0 or ratios.q3 < 1.0
    return SpeedupClaim(
        speedup, ratios.q1, ratios.q3, len(method_ms), same_side and len(method_ms) >= MIN_ROUNDS_TO_CLAIM
    )


def time_once(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall time of one call in ms; on CUDA, measured with events between synchronisations.

    CUDA kernels run asynchronously, so a host clock would time the launch, not
    the work: we synchronise before starting (nothing earlier leaks in), record
    events around the call and wait for the end event.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Round ``r`` starts with function ``r mod len(fns)``, so no method always
    runs first (right after a slow one, or on a cold cache).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_once(fns[name], device))
        if progress is not None:
            progress(r + 1, repeats)
    return samples
