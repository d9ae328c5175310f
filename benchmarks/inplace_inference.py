"""What in-place residual sums and activations buy eager inference: before and after, interleaved, one process.

    OMP_NUM_THREADS=2 python benchmarks/inplace_inference.py --json benchmarks/results/inplace_inference.json

dsnet's cached plans (``model(x, subnet=k)`` and dynamic inference) are built with
``dsnet.models.static.inplace_inference`` (since 5abd7be): each ``StaticResidual`` forms ``body(x) + shortcut(x)``
in the body's output and applies its ReLU in place, and every activation that follows a convolution runs in place.
This script builds the plans of one of two copies of the same model without that pass (the previous behaviour) and
times, per model and batch size, alternating the copies round by round (which goes first alternates too): the
slimmest and the widest routed sub-network (``model(x, subnet=k)``, the plan) and dynamic inference on a fixed
routing mix (0.4 / 0.3 / 0.2 / 0.1, ``forced_routing``), random weights, channels-last. Reported: each median and
the median of the per-round ratios before / after with their quartiles (above 1: faster now). The outputs of the two
copies are compared first (max abs difference).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsnet  # noqa: E402
import dsnet.models.base as base  # noqa: E402
from dsnet.utils.allocator import steady_allocator  # noqa: E402

CASES = [
    ("ds_resnet50", 32, 224),
    ("ds_mobilenet_v1", 32, 224),
    ("ds_resnet8_tiny", 256, 28),
    ("ds_resnet8_tiny", 1, 28),
]
_NEW_PASS = base.inplace_inference


@contextmanager
def behaviour(version: str) -> Iterator[None]:
    """``before``: plans built inside skip the in-place pass (out-of-place sums and activations); ``after``: as
    shipped."""
    if version == "before":
        base.inplace_inference = lambda net: 0
    try:
        yield
    finally:
        base.inplace_inference = _NEW_PASS


def measure(name: str, batch: int, size: int, rounds: int) -> dict:
    torch.manual_seed(0)
    after = dsnet.create_model(name).eval()
    models = {"before": copy.deepcopy(after), "after": after}
    for m in models.values():
        m.to(memory_format=torch.channels_last)
    x = torch.randn(batch, after.in_chans, size, size).contiguous(memory_format=torch.channels_last)
    space = after.routing_space
    mix = [0.4, 0.3, 0.2, 0.1] if len(space) == 4 else [1 / len(space)] * len(space)
    counts = [round(batch * w) for w in mix]
    counts[0] += batch - sum(counts)
    choices = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])

    def calls(model: dsnet.DynamicNet) -> dict:
        def dynamic() -> torch.Tensor:
            with model.forced_routing(choices):
                return model(x)

        return {
            "slimmest": lambda: model(x, subnet=space[0]),
            "widest": lambda: model(x, subnet=space[-1]),
            "dynamic": dynamic,
        }

    fns = {v: calls(m) for v, m in models.items()}
    outs = {}
    with torch.inference_mode():
        for v in models:
            with behaviour(v):
                for _ in range(3):  # the second call builds the plans, the third runs them
                    outs[v] = [f() for f in fns[v].values()]
        diff = max(float((a - b).abs().max()) for a, b in zip(outs["before"], outs["after"]))
        samples: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for v in list(models)[:: 1 if r % 2 == 0 else -1]:  # which copy goes first alternates
                with behaviour(v):
                    for what, f in fns[v].items():
                        t = time.perf_counter()
                        f()
                        samples.setdefault((what, v), []).append((time.perf_counter() - t) * 1e3)
    rows = {}
    for what in ("slimmest", "widest", "dynamic"):
        b, a = samples[(what, "before")], samples[(what, "after")]
        ratios = sorted(p / q for p, q in zip(b, a))
        n = len(ratios)
        rows[what] = {
            "before_ms": round(statistics.median(b), 3),
            "after_ms": round(statistics.median(a), 3),
            "before_over_after": round(statistics.median(ratios), 3),
            "quartiles": [round(ratios[n // 4], 3), round(ratios[(3 * n) // 4], 3)],
        }
    return {"model": name, "batch": batch, "input": [after.in_chans, size, size], "rounds": rounds,
            "mix": mix, "max_abs_diff": diff, "timings": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds (default: 20 at 224 px, 120 at 28 px, 400 at batch 1)"
    )
    p.add_argument(
        "--case", action="append", default=None, metavar="MODEL:BATCH:SIZE",
        help="time only these (repeatable; default: ds_resnet50:32:224, ds_mobilenet_v1:32:224, "
        "ds_resnet8_tiny:256:28, ds_resnet8_tiny:1:28)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cases = CASES
    if args.case:
        try:
            cases = [(n, int(b), int(s)) for n, b, s in (c.split(":") for c in args.case)]
        except ValueError:
            p.error(f"--case takes MODEL:BATCH:SIZE, got {args.case}")
    torch.set_num_threads(args.threads)
    steady_allocator()
    results = []
    for name, batch, size in cases:
        rounds = args.rounds or (400 if batch == 1 else 20 if size >= 224 else 120)
        r = measure(name, batch, size, rounds)
        results.append(r)
        for what, row in r["timings"].items():
            print(f"{name} batch {batch} {what:9s} before {row['before_ms']:9.3f} ms  after {row['after_ms']:9.3f} ms  "
                  f"before/after {row['before_over_after']:.3f} ({row['quartiles'][0]:.3f}-{row['quartiles'][1]:.3f})"
                  f"  max |diff| {r['max_abs_diff']:.1e}", flush=True)  # fmt: skip
    out = {"command": " ".join(sys.argv), "threads": args.threads, "torch": torch.__version__, "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
