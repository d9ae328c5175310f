"""The fine-tuning default (issue 19): teacher and learning rate, read from ``byo_fashion_mnist.py`` results.

Two settings, two seeds each:

* ``folder4000``: a 4,000-image folder, 400 held out, 6 epochs alone + 6 of fine-tuning
  (``byo_folder4000_ft6_<variant>_seed<K>.json``). Each run trains its own source and scratch-total (they move
  by up to 0.5 point between runs of one seed when the thread count differs); every difference is against the
  run's own.
* ``subset12800``: 12,800 Fashion-MNIST training images, 5,000 held out, 6 epochs alone + 2 of fine-tuning
  (``byo_ft2_<variant>_seed<K>.json``). Every variant of a seed fine-tunes the same source (bit-identical between
  the runs, checked here); scratch-total comes from the seed's ``src01`` run.

For each variant: the routed sub-networks minus scratch-total's static curve at the same MMACs (test split), and
the largest sub-network minus the source network (held-out slice and test split). Mean over the seeds found, with
each seed's value. ``python benchmarks/byo_finetune_choice.py --json benchmarks/results/byo_finetune_choice.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.byo_fashion_mnist import routed_vs_curve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("src01", "lr03", "src10", "lab01", "lab03", "lab10")  # file names; teacher and lr come from each run
SETTINGS = {
    "folder4000": ("byo_folder4000_ft6_{variant}_seed{seed}.json", None),
    "subset12800": ("byo_ft2_{variant}_seed{seed}.json", "src01"),
}


def _teacher(finetune: dict) -> str:
    """``labels`` for ``supernet.distill: none``, else what taught the narrower sub-networks."""
    return "labels" if finetune["distill"] == "none" else finetune["distill"]


def _point(results: Path, setting: str, variant: str, seed: int) -> dict | None:
    pattern, reference = SETTINGS[setting]
    path = results / pattern.format(variant=variant, seed=seed)
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    parts = {"import": run["import"]}
    if "scratch-total" in run:
        parts["scratch-total"] = run["scratch-total"]
    elif reference is not None:
        ref_path = results / pattern.format(variant=reference, seed=seed)
        if not ref_path.is_file():
            return None
        ref = json.loads(ref_path.read_text())
        if ref["alone"]["test_top1"] != run["alone"]["test_top1"]:
            raise SystemExit(f"{path.name}: its source differs from {ref_path.name}'s, so scratch-total is not shared")
        parts["scratch-total"] = ref["scratch-total"]
    curve = routed_vs_curve(parts, "import", "scratch-total")
    if curve is None:
        return None
    imp = run["import"]
    return {
        "file": path.name,
        "routed_vs_scratch_total": curve["mean"],
        "largest_minus_source_holdout": round(imp["largest_holdout_top1"] - imp["source_holdout_top1"], 2),
        "largest_minus_source_test": round(imp["subnets"][-1]["test_top1"] - run["alone"]["test_top1"], 2),
        "finetune": imp["finetune"],
    }


def table(results: Path = RESULTS, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Every (setting, variant) with at least one seed's results: per-seed points and their means."""
    out: dict = {}
    for setting in SETTINGS:
        for variant in VARIANTS:
            points = {s: p for s in seeds if (p := _point(results, setting, variant, s)) is not None}
            if not points:
                continue
            plans = {(_teacher(p["finetune"]), p["finetune"]["lr_scale"]) for p in points.values()}
            if len(plans) > 1:
                raise SystemExit(f"{setting} {variant}: its seeds fine-tuned differently ({sorted(plans)})")
            [(teacher, lr)] = plans
            keys = ("routed_vs_scratch_total", "largest_minus_source_holdout", "largest_minus_source_test")
            out.setdefault(setting, {})[variant] = {
                "teacher": teacher,
                "lr_scale": lr,
                "seeds": points,
                **{f"mean_{k}": round(statistics.fmean(p[k] for p in points.values()), 2) for k in keys},
            }
    return out


def render(rows: dict) -> str:
    lines = [
        "| setting | teacher | lr | seeds | routed - scratch-total | largest - source, held-out "
        "| largest - source, test |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, variants in rows.items():
        for r in variants.values():
            seeds = r["seeds"]

            def cell(key: str, seeds: dict = seeds, r: dict = r) -> str:
                each = " ; ".join(f"{p[key]:+.2f}" for p in seeds.values())
                return f"**{r['mean_' + key]:+.2f}** ({each})" if len(seeds) > 1 else each

            lines.append(
                f"| {setting} | {r['teacher']} | x{r['lr_scale']:g} | {', '.join(map(str, seeds))} | "
                f"{cell('routed_vs_scratch_total')} | {cell('largest_minus_source_holdout')} | "
                f"{cell('largest_minus_source_test')} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = table(args.results)
    print(render(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
