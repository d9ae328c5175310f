"""The full comparison (quickstart setting), one seed per invocation, then merged: mean ± std over seeds.

``dsnet compare --seeds 3`` in the full quickstart setting takes hours on two CPU cores, longer than one
working session, and a run folder does not outlive it. So each seed runs on its own (``--set seed=K``, the
same recipe, data and methods) and its ``compare.json`` is kept under ``benchmarks/results/``; ``merge``
averages the seeds that are there with the same rules as ``dsnet compare --seeds`` (points present in every
seed, mean and sample std of top-1, claims re-checked on the means; timing from the lowest seed's run).

    python benchmarks/compare_full.py run --seed 0 --threads 1     # ~1-1.5 h on 2 idle cores
    python benchmarks/compare_full.py merge                        # compare_full.json / .md, docs/compare_full.png

Run one at a time on an otherwise idle machine (the timing part of each seed measures latency).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results")
PREFIX = "compare_full_seed"


def run_seed(seed: int, out: Path, threads: int | None, methods: list[str] | None) -> Path:
    """One seed of the full comparison; returns the results file it copied under benchmarks/results/."""
    from dsnet.compare.run import run_compare
    from dsnet.utils.threads import set_threads

    if threads:
        set_threads(threads)
    run_dir = out / f"seed{seed}"
    run_compare(run_dir, fast=False, methods=methods, seeds=1, overrides=[f"seed={seed}"])
    target = RESULTS / f"{PREFIX}{seed}.json"
    shutil.copyfile(run_dir / "compare.json", target)
    shutil.copyfile(run_dir / "compare.md", RESULTS / f"{PREFIX}{seed}.md")
    print(f"[compare_full] seed {seed}: {target}")
    return target


def merge(files: list[Path]) -> dict[str, Any]:
    """Mean ± std over the per-seed results (the same aggregation as ``dsnet compare --seeds``)."""
    from dsnet.compare.run import aggregate_points, check_claims, timing_noise

    runs = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["seeds"][0])
    if not runs:
        raise SystemExit(f"no {PREFIX}*.json under {RESULTS}: run a seed first")
    first = runs[0]

    def data(run: dict) -> tuple:  # what the images were (later runs also record the class count)
        return tuple(run["dataset"].get(k) for k in ("name", "train_images", "test_images"))

    for r in runs[1:]:
        if r["model"] != first["model"] or data(r) != data(first) or r["fast"] != first["fast"]:
            raise SystemExit("the per-seed results differ in model, data or setting: not merging")
    for r in runs:  # results written before cascade points were named by index alone ("cascade 3/21 (t=0.54)")
        for p in r["points"]:
            p["name"] = re.sub(r"^(cascade \d+/\d+) \(t=[^)]*\)$", r"\1", p["name"])
    per_seed = [r["points"] for r in runs]
    points = aggregate_points(per_seed)
    timed = {p["name"]: p for p in first["points"]}
    for p in points:
        for key in ("latency_ms_b1", "latency_ms_batch", "iqr_ms_b1", "iqr_ms_batch"):
            p[key] = timed[p["name"]].get(key)
    seconds: dict[str, list[float | None]] = {}
    for r in runs:
        for m, v in r["train_seconds"].items():
            seconds.setdefault(m, []).append(v)
    result = copy.deepcopy(first)
    num_classes = first["config"].get("model", {}).get("kwargs", {}).get("num_classes") or 10
    result.update(
        seeds=[r["seeds"][0] for r in runs],
        points=points,
        per_seed_points=per_seed,
        train_seconds_per_seed=seconds,
        claims=check_claims(points, num_classes, first["config"]),
        timing_noise=timing_noise(points),
        total_seconds=round(sum(r["total_seconds"] for r in runs), 1),
    )
    result["timing"]["note"] = f"{first['timing']['note']}; timing from seed {first['seeds'][0]}'s run"
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one seed of the full comparison")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--out", type=Path, default=Path("runs/compare_full"))
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--methods", default=None, help="comma-separated (default: all)")
    sub.add_parser("merge", help="merge the per-seed results under benchmarks/results/")
    args = p.parse_args()
    if args.cmd == "run":
        run_seed(args.seed, args.out, args.threads, args.methods.split(",") if args.methods else None)
        return
    from dsnet.compare.report import plot_compare, render_markdown, render_screen
    from dsnet.utils.io import atomic_write_json, atomic_write_text

    result = merge(sorted(RESULTS.glob(f"{PREFIX}*.json")))
    atomic_write_json(result, RESULTS / "compare_full.json")
    atomic_write_text(render_markdown(result), RESULTS / "compare_full.md")
    plot_compare(result, Path("docs/compare_full.png"))
    print(render_screen(result))


if __name__ == "__main__":
    main()
