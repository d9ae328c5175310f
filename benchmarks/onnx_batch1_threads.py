"""ONNX Runtime intra-op threads per batch size: the dynamic bundle and its static networks, 1 thread vs N.

Exports a model's dynamic bundle (random weights: latency does not depend on them) and its slimmest and widest
routed sub-networks as static graphs, then for each thread count and batch size times, interleaved (each round
every variant in turn, ``--calls`` calls each; medians over rounds): the widest and the slimmest static network,
and the bundle forced to its slimmest and to its widest choice (``OnnxDynamicModel(..., choice=...)``: the same
graphs the router runs, so the difference to the static network is the bundle's own overhead). Every session has
spinning off (``dsnet.export.onnx.ort_session``; ``benchmarks/onnx_bundle_threads.py`` measures spinning on).

    OMP_NUM_THREADS=2 python benchmarks/onnx_batch1_threads.py --threads 1,2 \\
        --json benchmarks/results/onnx_batch1_threads.json

What it answers: at which batch sizes one thread beats N for a small network (the reason for
``OnnxDynamicModel``'s ``batch1_threads`` and ``OnnxServing``'s ``batch1_threads="auto"``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dsnet
from dsnet.export.onnx import OnnxDynamicModel, export_dynamic, export_static, ort_session
from dsnet.utils.io import atomic_write_json
from dsnet.utils.latency import machine_identity


def _variants(widest, slimmest, bundle: OnnxDynamicModel, x: np.ndarray, choices: int) -> dict:  # noqa: ANN001
    """The four timed calls on ``x``: both static networks, the bundle forced to its first and last choice."""
    first = np.zeros(len(x), dtype=np.int64)
    last = np.full(len(x), choices - 1, dtype=np.int64)
    return {
        "static_widest": lambda: widest.run(None, {"input": x}),
        "static_slimmest": lambda: slimmest.run(None, {"input": x}),
        "bundle_slimmest": lambda: bundle(x, choice=first),
        "bundle_widest": lambda: bundle(x, choice=last),
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ds_resnet8_tiny")
    p.add_argument("--gate-mode", default="exit", choices=("pre", "exit"), help="the bundle's gate (recipe: exit)")
    p.add_argument("--threads", type=_ints, default=[1, 2])
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16, 64, 256])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=None, help="calls per variant and round (default: 400 / batch)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = dsnet.create_model(args.model, gate_mode=args.gate_mode).eval()
    size = tuple(model.default_input_size)
    space = model.routing_space
    macs = model.subnet_macs(size)
    slim, wide = min(space, key=macs.__getitem__), max(space, key=macs.__getitem__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_dynamic(model, Path(tmp) / "dynamic.onnx", size)
        paths = {k: export_static(model, k, Path(tmp) / f"static{k}.onnx", size) for k in (slim, wide)}
        for threads in args.threads:
            bundle = OnnxDynamicModel(manifest, threads)
            statics = {k: ort_session(path, threads) for k, path in paths.items()}
            for batch in args.batch_sizes:
                x = np.random.default_rng(0).standard_normal((batch, *size)).astype(np.float32)
                variants = _variants(statics[wide], statics[slim], bundle, x, len(space))
                calls = args.calls or max(4, 400 // batch)
                times: dict[str, list[float]] = {k: [] for k in variants}
                for fn in variants.values():
                    fn()
                for _ in range(args.rounds):
                    for name, fn in variants.items():
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        times[name].append((time.perf_counter() - t0) / calls * 1e3)
                row = {"threads": threads, "batch_size": batch, **{k: float(np.median(v)) for k, v in times.items()}}
                rows.append(row)
                print(
                    f"threads {threads} batch {batch:4d}: "
                    + ", ".join(f"{k} {row[k]:.4f} ms" for k in variants)
                    + f" (bundle overhead: slimmest {row['bundle_slimmest'] - row['static_slimmest']:+.4f}, widest "
                    f"{row['bundle_widest'] - row['static_widest']:+.4f} ms)",
                    flush=True,
                )
    if args.json:
        report = {
            "schema": "dsnet-onnx-batch1-threads-v1",
            "machine": machine_identity("cpu"),
            "model": args.model,
            "gate_mode": args.gate_mode,
            "input_size": list(size),
            "rounds": args.rounds,
            "note": "ms per call, medians over interleaved rounds; spinning off",
            "rows": rows,
        }
        atomic_write_json(report, Path(args.json))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
