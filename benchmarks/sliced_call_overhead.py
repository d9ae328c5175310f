"""What a sliced layer costs per call at inference, beyond its kernel, and sliced / static at batch 1.

Two measurements (``docs/benchmarks.md``, "What this version changed"):

    python benchmarks/sliced_call_overhead.py calls
    python benchmarks/sliced_call_overhead.py ratio --model ds_resnet50 --batch 1 --rounds 20

``calls`` times, on a tiny input (1x8x4x4, one thread) where the convolution itself costs little, one call of a
folded conv+BN (``SlicedConv2d.forward_bn`` in eval mode, cached), a sliced convolution, ``nn.Conv2d`` and the
bare ``F.conv2d`` on the cached weight: 15 interleaved rounds of 2,000 calls each, min and median microseconds.

``ratio`` builds the model (random weights, channels-last, 2 threads) and times ``model(x, subnet=k)`` against
``model.extract(k)`` for the slimmest and the widest routed sub-network, interleaved (which runs first alternates
per round), and prints one line: per sub-network the ratio of medians, then the median and quartiles of the
per-round (paired) ratios, and the static network's median ms. ``--allocator system`` leaves glibc's malloc
adaptive (``dsnet.utils.allocator``; the default, ``steady``, fixes its thresholds as every dsnet command does).

To compare two versions of dsnet side by side, run ``ratio`` alternately with each on ``PYTHONPATH`` (e.g. ``git
archive REV dsnet | tar -x -C /tmp/old``; then ``PYTHONPATH=/tmp/old python benchmarks/sliced_call_overhead.py
ratio ...`` and the same with the working tree), A B A B, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch
import torch.nn.functional as F
from torch import nn

import dsnet
from dsnet.layers import SlicedBatchNorm2d, SlicedConv2d
from dsnet.utils.allocator import ALLOCATOR_SETTINGS, allocator_setting, steady_allocator


def calls(rounds: int = 15, number: int = 2000) -> None:
    torch.set_num_threads(1)
    conv, bn = SlicedConv2d(16, 16, 3, padding=1), SlicedBatchNorm2d(16, 2).eval()
    ref = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        conv.forward_bn(x, bn, 0, 8)
        conv(x, 8)
        weight = conv.weight[:8, :8].contiguous()
        fns = {
            "folded conv+BN (forward_bn)": lambda: conv.forward_bn(x, bn, 0, 8),
            "sliced conv (forward)": lambda: conv(x, 8),
            "nn.Conv2d": lambda: ref(x),
            "F.conv2d": lambda: F.conv2d(x, weight, None, 1, 1),
        }
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(timeit.timeit(fn, number=number) / number * 1e6)
    print(f"dsnet at {dsnet.__file__}")
    for name, t in times.items():
        print(f"{name:30s} min {min(t):6.2f} us  median {statistics.median(t):6.2f} us")


def ratio(model_name: str, batch: int, rounds: int) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = dsnet.create_model(model_name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    widest = max(model.routing_space)
    out = []
    with torch.inference_mode():
        for k in (min(model.routing_space), widest):
            static = model.extract(k).eval().to(memory_format=torch.channels_last)
            fns = {"sliced": lambda k=k: model(x, subnet=k), "static": lambda s=static: s(x)}
            for fn in fns.values():
                fn()
                fn()
            times: dict[str, list[float]] = {name: [] for name in fns}
            names = list(fns)
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:  # alternate which one runs first
                    start = time.perf_counter()
                    fns[name]()
                    times[name].append(time.perf_counter() - start)
            static_ms = statistics.median(times["static"]) * 1e3
            # per-round (paired) ratios: a machine that changes speed between rounds moves both timings alike
            paired = [a / b for a, b in zip(times["sliced"], times["static"])]
            q1, mid, q3 = statistics.quantiles(paired, n=4, method="inclusive")
            out.append(
                f"k{k} {statistics.median(times['sliced']) * 1e3 / static_ms:.3f} "
                f"paired {mid:.3f} [{q1:.3f}, {q3:.3f}] ({static_ms:.1f} ms)"
            )
    where = dsnet.__file__.rsplit("/dsnet/", 1)[0]
    print(where, f"{allocator_setting()} allocator", model_name, f"b{batch}", " ".join(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("calls", help="per-call microseconds of the sliced layers' inference paths")
    r = sub.add_parser("ratio", help="sliced / static of the slimmest and widest routed sub-network")
    r.add_argument("--model", default="ds_resnet50")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--rounds", type=int, default=20)
    r.add_argument("--allocator", choices=ALLOCATOR_SETTINGS, default="steady", help="as dsnet's --allocator")
    args = p.parse_args(argv)
    if getattr(args, "allocator", "steady") == "steady":
        steady_allocator()
    if args.cmd == "calls":
        calls()
    else:
        ratio(args.model, args.batch, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
