"""A latency-budget gate's measured latency against its target, at batch 1 and a large batch (issue 22, item 3).

For a trained gate checkpoint (default: the quickstart's, ``runs/qs_s2/gate/best.ckpt``):

1. measure its latency table here (``dsnet.bench.latency.measure_latency_table``: each routing choice's ms per
   image, eager, per batch size, interleaved rounds; written next to the results);
2. for each batch size and each target between its slimmest and its widest routing choice (``--positions``:
   0 = the slimmest's ms, 1 = the widest's), calibrate the stored budget bias to the target in ms on held-out
   training images (``calibrate_budget(target_ms=..., latency_table=...)``, the checkpoint's selection split);
3. time the routed model on test images at that batch size (``measure_routed_latency``: its own gate, every
   choice forced again in the same interleaved rounds, so drift since the table shows), and evaluate its top-1
   and mean MACs on them.

The table it prints (and ``--json``) has, per batch size and target: the target, the table's prediction for
the gate's mix on the test images, the measured ms per image (median, ±IQR/2), measured / target, the
machine's drift (choices now / in the table), the mix, top-1 and MMACs.

Run it on an otherwise idle machine, from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/latency_budget.py --checkpoint runs/qs_s2/gate/best.ckpt \\
        --threads 1 --json benchmarks/results/latency_budget_qs.json

A smoke run (well under 2 minutes): ``--batch-sizes 1,64 --positions 0.5 --calibration-images 256
--test-images 128 --repeats 3 --table-repeats 3``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from dsnet.bench.latency import format_latency_table, measure_latency_table, measure_routed_latency
from dsnet.data import build_loader
from dsnet.data.recipe import with_recorded_recipe
from dsnet.train.checkpoint import load_model
from dsnet.train.gate import calibrate_budget
from dsnet.utils.allocator import ALLOCATOR_SETTINGS, steady_allocator
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _images(loader, limit: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x[: limit - seen])
        ys.append(y[: limit - seen])
        seen += xs[-1].shape[0]
        if seen >= limit:
            break
    return torch.cat(xs), torch.cat(ys)


@torch.inference_mode()
def _accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> tuple[float, float]:  # noqa: ANN001
    """Top-1 (%) and mean MMACs per image of the routed model on the images."""
    table = model.routing_macs(tuple(images.shape[1:]))
    correct, macs = 0, 0.0
    for i in range(0, images.shape[0], batch):
        r = model(images[i : i + batch], return_routing=True)
        correct += int((r.logits.argmax(1) == labels[i : i + batch]).sum())
        macs += float(table[r.choice].sum())
    return 100.0 * correct / images.shape[0], macs / images.shape[0] / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/qs_s2/gate/best.ckpt")
    p.add_argument("--data", metavar="DIR", help="dataset root (overrides the checkpoint's data.root)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 256])
    p.add_argument("--positions", type=_floats, default=[0.25, 0.5, 0.75], help="targets: 0 slimmest .. 1 widest ms")
    p.add_argument("--calibration-images", type=int, default=5000, help="held-out training images (calibration)")
    p.add_argument("--test-images", type=int, default=1024, help="test images timed (batch 1: the first 256)")
    p.add_argument("--table-repeats", type=int, default=None, help="rounds per batch size (default 30 at 1, else 7)")
    p.add_argument("--repeats", type=int, default=9, help="rounds of the routed check")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the current count)")
    p.add_argument("--table", default=None, help="write the latency table here (default: next to --json)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--allocator", choices=ALLOCATOR_SETTINGS, default="steady", help="as dsnet's --allocator")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "steady":
        steady_allocator()
    t0 = time.time()
    model, ckpt = load_model(args.checkpoint)
    model.eval()
    data = copy.deepcopy((ckpt.get("config") or {}).get("data") or {})
    if not data:
        raise SystemExit(f"{args.checkpoint} records no data config")
    data["workers"] = 0
    if args.data:
        data["root"] = args.data
    data = with_recorded_recipe(data, ckpt.get("dataset"))
    split = "val" if data.get("holdout") == 0 else "holdout"
    calib_loader, _ = build_loader(data, split, seed=0)
    test_loader, info = build_loader(data, "val", seed=0)
    calib_x, _ = _images(calib_loader, args.calibration_images)
    calib = [(calib_x[i : i + 256], None) for i in range(0, len(calib_x), 256)]
    test_x, test_y = _images(test_loader, args.test_images)
    size = tuple(test_x.shape[1:])
    name = ckpt["model"]["name"]
    print(f"{args.checkpoint}: {name} ({model.gate_mode} gate) on {info.name}, {size}; "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)  # fmt: skip
    table = measure_latency_table(
        model,
        batch_sizes=args.batch_sizes,
        repeats=args.table_repeats,
        input_size=size,
        model_name=name,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    table.data["command"] = "python benchmarks/latency_budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_latency_table(table))
    table_path = args.table or (str(Path(args.json).with_suffix("")) + "_table.json" if args.json else None)
    if table_path:
        table.save(table_path)
    stored = model.gate.budget_bias.clone()
    results = []
    for batch in args.batch_sizes:
        ms = table.choice_ms(batch)
        images = test_x[: min(len(test_x), 256)] if batch == 1 else test_x
        for pos in args.positions:
            target = ms[0] + pos * (ms[-1] - ms[0])
            bias = calibrate_budget(model, calib, target_ms=target, latency_table=table, batch_size=batch)
            r = measure_routed_latency(model, images, table, batch_size=batch, repeats=args.repeats)
            top1, mmacs = _accuracy(model, test_x, test_y)
            q1, _, q3 = statistics.quantiles([v / target for v in r["routed_rounds_ms"]], n=4, method="inclusive")
            results.append(
                {
                    "batch_size": batch,
                    "position": pos,
                    "target_ms": target,
                    "bias": bias,
                    "predicted_ms": r["table_ms"],
                    "measured_ms": r["routed_ms"],
                    "measured_iqr_ms": r["routed_iqr_ms"],
                    "measured_over_target": r["routed_ms"] / target,
                    "per_round_over_target_q1": q1,
                    "per_round_over_target_q3": q3,
                    "within_10pct": abs(r["routed_ms"] / target - 1) <= 0.10,
                    "drift_median": statistics.median(r["drift"]),
                    "routed_over_fresh_prediction": r["round_ratio_median"],
                    "shares": r["shares"],
                    "timed_images": r["images"],
                    "top1": top1,
                    "mmacs": mmacs,
                    "check": {k: v for k, v in r.items() if k != "routed_rounds_ms"},
                }
            )
            print(f"batch {batch}, target {target:.4f} ms: measured {r['routed_ms']:.4f} ms "
                  f"({r['routed_ms'] / target:.3f}x)", file=sys.stderr, flush=True)  # fmt: skip
    model.gate.budget_bias.copy_(stored)
    rows = [
        [
            r["batch_size"],
            f"{r['target_ms']:.4f}",
            f"{r['predicted_ms']:.4f}",
            f"{r['measured_ms']:.4f} ±{r['measured_iqr_ms'] / 2:.4f}",
            f"{r['measured_over_target']:.3f}",
            f"{r['drift_median']:.3f}",
            "/".join(f"{100 * s:.0f}" for s in r["shares"]),
            f"{r['top1']:.2f}",
            f"{r['mmacs']:.2f}",
        ]
        for r in results
    ]
    headers = ["batch", "target ms", "predicted", "measured ms/image", "measured/target", "drift", "mix %",
               "top-1 %", "MMACs"]  # fmt: skip
    m = table.data["machine"]
    print()
    print(format_table(headers, rows, title=f"latency budget on {m['device_name']} ({m['threads']} threads, "
                       f"{m['allocator']} allocator), "
                       f"{len(test_x)} {info.name} test images (batch 1: {min(len(test_x), 256)})"))  # fmt: skip
    print("predicted: sum of share x ms from the table for the gate's mix on the timed images; drift: the "
          "choices' ms during the check over the table's (1 = the machine kept its speed)")  # fmt: skip
    if args.json:
        out = {
            "checkpoint": args.checkpoint,
            "model": name,
            "dataset": info.name,
            "machine": m,
            "table": table_path,
            "results": results,
            "seconds": time.time() - t0,
            "command": table.data["command"],
        }
        atomic_write_json(out, args.json)
        print(f"wrote {args.json}" + (f" and {table_path}" if table_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
