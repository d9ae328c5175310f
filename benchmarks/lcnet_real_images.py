"""A trained LC-Net on its real test images: operating points, and its own inference timed against the dense network.

    python benchmarks/lcnet_real_images.py runs/lcnet_fmnist/best.ckpt --json benchmarks/results/lcnet_fmnist.json

Accuracy and mean MACs come from ``dsnet.train.lcnet.evaluate_lcnet`` on the
checkpoint's reported split ("val", the test split for Fashion-MNIST). The
timing runs, in one interleaved loop per batch size, on the first test
images: ``lcnet`` (the model's own skip decisions and per-sample channel
gather), ``lcnet_mask`` (the same outputs, computed at full width and
masked), ``lcnet_prefix`` (the same skips, the first k channels instead of
the salient ones: a cost reference) and ``dense`` (every block, every channel).
"""

from __future__ import annotations

import argparse
import json

import torch

from dsnet.bench.lcnet import inference_fn
from dsnet.bench.timing import interleaved, summarize
from dsnet.data import build_loader
from dsnet.train.checkpoint import load_model
from dsnet.train.lcnet import evaluate_lcnet, format_points
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table

BIASES = [-1e9, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 1e9]  # +-1e9: no block skipped / every skippable block skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="default 30 at batch 1, 10 otherwise")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.checkpoint)
    loader, info = build_loader(ckpt["config"]["data"], "val", seed=0)
    points = evaluate_lcnet(model, loader, skip_biases=BIASES)
    densities = evaluate_lcnet(model, loader, densities=[0.25, 0.375, 0.5, 0.625, 0.75, 1.0])
    print(format_points(points, title=f"{ckpt['model']['name']} on {info.name} ({info.num_samples} test images)"))
    print(format_points(densities, title="run-time density, skip bias 0"))
    images = torch.cat([x for x, _ in loader])
    timing = []
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        batches = [images[i * b : (i + 1) * b].contiguous() for i in range(10 if b == 1 else 1)]
        run_all = torch.ones(b, len(model.blocks), dtype=torch.bool)

        def cycle(batches=batches, **options):
            calls = [inference_fn(model, x, **options) for x in batches]
            return lambda: [call() for call in calls]

        fns = {
            "lcnet": cycle(),
            "lcnet_mask": cycle(channel_mode="mask"),
            "lcnet_prefix": cycle(channel_mode="prefix"),
            "dense": cycle(channel_mode="prefix", density=1.0, execute=run_all),
        }
        repeats = args.repeats or (30 if b == 1 else 10)
        samples = interleaved(fns, repeats, warmup=2)
        stats = {k: summarize([t / len(batches) for t in v]).as_dict() for k, v in samples.items()}
        macs = torch.cat([model.count_macs(x) for x in batches]).double().mean().item()
        timing.append({"batch_size": b, "repeats": repeats, "lcnet_mean_macs": macs, "methods": stats})
        dense = stats["dense"]["median"]
        rows = [[k, f"{v['median']:.2f} ±{v['iqr'] / 2:.2f}", f"{dense / v['median']:.2f}x"] for k, v in stats.items()]
        title = f"batch {b}: ms per batch, {repeats} interleaved rounds; lcnet {macs / 1e6:.2f} MMACs per image"
        print(format_table(["method", "ms (±IQR/2)", "speed-up vs dense"], rows, title=title))
    report = {
        "checkpoint": args.checkpoint,
        "model": ckpt["model"],
        "threads": torch.get_num_threads(),
        "skip_bias_sweep": points,
        "density_sweep": densities,
        "timing": timing,
    }
    if args.json:
        atomic_write_json(report, args.json)
    else:
        print(json.dumps(timing, indent=1))


if __name__ == "__main__":
    main()
