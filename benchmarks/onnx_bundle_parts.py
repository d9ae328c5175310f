"""Where an ONNX Runtime bundle's time goes at one batch size: its graphs, its grouping, and the static networks.

Exports a trained gate checkpoint's dynamic bundle and a static graph per routing choice, routes the first
``--batch`` test images with the bundle's own gate, then times, interleaved (``dsnet.bench.timing``): the bundle
call; its parts (the pre-gate graph on the whole batch, each routed graph on its group, the gather of each
group's features); each static network on its group (issue 20's *routed groups*); the slimmest and the widest
static network on the whole batch. Medians and the ratios that follow from them:

* ``bundle / parts``: what the bundle's Python routing (argmax, gather, scatter) adds to its graphs;
* ``parts / routed groups``: what the bundle's graphs cost against the static networks on the same groups;
* ``widest / bundle``: the speed-up issue 20 asks to be at least 2x at batch 256; ``widest / routed groups``:
  the same for a router that costs nothing;
* ``widest / slimmest`` against their MAC ratio: how fast a narrow network runs in this runtime.

``--profile N`` adds where each of those two networks spends its time: ONNX Runtime's own profiler over ``N``
runs of the whole batch, per convolution its kernel ms, its multiply-adds (from the profiled shapes) and the
rate (GMAC/s), and the share of the graph's kernel time that is convolution.

    python benchmarks/onnx_bundle_parts.py --checkpoint runs/qs/gate/best.ckpt --batch 256 --threads 2 \\
        --json benchmarks/results/onnx_bundle_parts_b256.json [--profile 20]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsnet.bench.timing import interleaved  # noqa: E402
from dsnet.data import first_images  # noqa: E402
from dsnet.data.recipe import with_recorded_recipe  # noqa: E402
from dsnet.export.onnx import OnnxDynamicModel, export_dynamic, export_static, ort_session  # noqa: E402
from dsnet.train.checkpoint import load_model  # noqa: E402


def first_test_images(ckpt: dict, n: int) -> np.ndarray:
    """The first ``n`` images of the checkpoint's test split, prepared with its recorded data recipe."""
    data = with_recorded_recipe(ckpt["config"]["data"], ckpt.get("dataset"))
    try:
        images, _ = first_images(data, "val", n)
    except ValueError as err:
        raise SystemExit(f"{err} (--batch {n})") from None
    return np.ascontiguousarray(images.numpy(), dtype=np.float32)


def measure(model: torch.nn.Module, x: np.ndarray, threads: int, repeats: int, out_dir: Path) -> dict:
    """Export ``model`` into ``out_dir``, route the images ``x`` with its bundle, time every part (see above)."""
    model.eval()
    manifest = export_dynamic(model, out_dir / "dynamic.onnx")
    space = model.routing_space
    statics = [ort_session(export_static(model, k, out_dir / f"static{j}.onnx"), threads) for j, k in enumerate(space)]
    bundle = OnnxDynamicModel(manifest, threads)
    _, choice = bundle(x)
    groups = {j: np.flatnonzero(choice == j) for j in range(len(space)) if (choice == j).any()}
    features = bundle.pre.run(None, {"input": x})[0]
    group_x = {j: np.ascontiguousarray(x[idx]) for j, idx in groups.items()}
    group_f = {j: np.ascontiguousarray(features[idx]) for j, idx in groups.items()}
    calls = {
        "bundle": lambda: bundle(x),
        "pre": lambda: bundle.pre.run(None, {"input": x}),
        "slimmest": lambda: statics[0].run(None, {"input": x}),
        "widest": lambda: statics[-1].run(None, {"input": x}),
    }
    for j, idx in groups.items():
        calls[f"gather{j}"] = lambda idx=idx: np.ascontiguousarray(features[idx])
        if bundle.post[j] is not None:
            calls[f"post{j}"] = lambda j=j: bundle.post[j].run(None, {"features": group_f[j]})
        calls[f"static{j}"] = lambda j=j: statics[j].run(None, {"input": group_x[j]})
    samples = interleaved(calls, repeats, warmup=2)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    parts = ms["pre"] + sum(ms[f"post{j}"] + ms[f"gather{j}"] for j in groups if f"post{j}" in ms)
    routed_groups = sum(ms[f"static{j}"] for j in groups)
    macs = model.subnet_macs(tuple(x.shape[1:]))
    mac_ratio = macs[space[-1]] / macs[space[0]]
    return {
        "batch": len(x),
        "threads": threads,
        "repeats": repeats,
        "routing": [round(float((choice == j).mean()), 4) for j in range(len(space))],
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "bundle_over_parts": round(ms["bundle"] / parts, 3),
        "parts_over_routed_groups": round(parts / routed_groups, 3),
        "bundle_over_routed_groups": round(ms["bundle"] / routed_groups, 3),
        "widest_over_bundle": round(ms["widest"] / ms["bundle"], 3),
        "widest_over_routed_groups": round(ms["widest"] / routed_groups, 3),  # what a router with no cost would give
        "widest_over_slimmest": round(ms["widest"] / ms["slimmest"], 3),
        "widest_over_slimmest_macs": round(mac_ratio, 3),
    }


def profile_convs(path: Path, x: np.ndarray, threads: int, runs: int, prefix: Path) -> dict:
    """ONNX Runtime's profiler over ``runs`` calls of the graph at ``path`` on ``x``: per convolution, ms and MACs.

    A convolution's multiply-adds are its output elements times its weight's elements per output channel (input
    channels per group x kernel), both read from the shapes the profiler records (logical NCHW shapes, also for
    the blocked layouts ONNX Runtime converts convolutions to). Times are kernel times, the mean per run.
    """
    session = ort_session(path, threads, profile_prefix=str(prefix))
    for _ in range(2):  # warm-up, inside the profile: dropped below by counting only the last `runs` calls
        session.run(None, {"input": x})
    for _ in range(runs):
        session.run(None, {"input": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 2)
    nodes = nodes[-per_run * runs :]
    convs: dict[str, dict] = {}
    kernel_us = 0.0
    for e in nodes:
        kernel_us += e["dur"]
        if e["args"].get("op_name") != "Conv":
            continue
        row = convs.setdefault(e["name"].removesuffix("_kernel_time"), {"us": 0.0})
        row["us"] += e["dur"]
        out = next(iter(e["args"]["output_type_shape"][0].values()))
        weight = next(iter(e["args"]["input_type_shape"][1].values()))
        row["output_shape"] = out
        row["weight_shape"] = weight
        row["macs"] = math.prod(out) * math.prod(weight[1:]) if len(weight) == 4 and len(out) == 4 else None
    rows = []
    for name, row in convs.items():
        ms = row["us"] / runs / 1e3
        macs = row["macs"]
        rows.append(
            {
                "node": name,
                "output_shape": row["output_shape"],
                "weight_shape": row["weight_shape"],
                "ms": round(ms, 4),
                "mmacs": None if macs is None else round(macs / 1e6, 3),
                "gmacs_per_s": None if macs is None or ms == 0 else round(macs / ms / 1e6, 1),
            }
        )
    conv_ms = sum(r["ms"] for r in rows)
    return {
        "runs": runs,
        "kernel_ms": round(kernel_us / runs / 1e3, 4),
        "conv_ms": round(conv_ms, 4),
        "conv_share": round(conv_ms / (kernel_us / runs / 1e3), 3) if kernel_us else None,
        "convs": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a trained gate checkpoint (dsnet quickstart's gate/best.ckpt)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25, help="interleaved rounds")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also profile the slimmest and widest static graphs over N runs each (per convolution: ms, MACs)",
    )  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.checkpoint)
    x = first_test_images(ckpt, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"checkpoint": args.checkpoint, **measure(model, x, args.threads, args.repeats, tmp)}
        if args.profile:
            last = len(model.routing_space) - 1
            result["profile"] = {
                name: profile_convs(tmp / f"static{j}.onnx", x, args.threads, args.profile, tmp / f"profile_{name}")
                for name, j in (("slimmest", 0), ("widest", last))
            }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
