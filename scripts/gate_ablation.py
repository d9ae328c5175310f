"""Stage II variants on the same supernets, chosen on held-out training images, reported on the test split.

Usage (after ``dsnet quickstart --seeds 3 --out runs/qs``)::

    python scripts/gate_ablation.py --supernets runs/qs/seed*/supernet/best.ckpt --out runs/gate_ablation

For each variant (``--variants``, default all of ``VARIANTS``) and each
supernet it trains the gate with the quickstart recipe plus the variant's
overrides, then evaluates the result twice: on the held-out slice of the
training set (``data.holdout``; what a variant is *chosen* on) and on the test
split (what is *reported*). Writes ``ablation.json`` and prints mean and
spread over seeds for both splits. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dsnet.data import build_loader
from dsnet.evaluation import evaluate
from dsnet.quickstart import quickstart_config
from dsnet.train.checkpoint import load_model, read_checkpoint
from dsnet.train.gate import train_gate
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table


# name (gate mode / task loss / SGS targets [@ budget]) -> overrides of the quickstart recipe's gate section.
# pre/routed/sandwich is the paper's stage II as literally specified; pre/mixed/sandwich adds the gradient fix.
# Without "@", the budget is the recipe's gate.target_fraction.
def _variant(mode: str, task: str, sgs: str, budget: float | None = None) -> tuple[str, list[str]]:
    name = f"{mode}/{task}/{sgs}" + ("" if budget is None else f"@{budget:g}")
    sets = [f"gate.mode={mode}", f"gate.task_loss={task}", f"gate.sgs_targets={sgs}"]
    return name, sets + ([] if budget is None else [f"gate.target_fraction={budget}"])


VARIANTS: dict[str, list[str]] = dict(
    _variant(*v)
    for v in (
        ("pre", "routed", "sandwich", 0.64),
        ("pre", "mixed", "sandwich", 0.64),
        ("pre", "mixed", "cheapest", 0.64),
        ("pre", "expected", "cheapest", 0.64),
        ("exit", "mixed", "sandwich", 0.64),
        ("exit", "mixed", "cheapest", 0.64),
        ("exit", "expected", "cheapest", 0.64),
        ("pre", "mixed", "cheapest", 0.35),
        ("exit", "mixed", "cheapest", 0.35),
    )
)
# the utility router [ours]: per-width P(correct), binary cross-entropy, routes by p_j - lam * MACs_j
VARIANTS.update(
    {
        f"{mode}/utility@{budget:g}": [f"gate.mode={mode}", "gate.router=utility", f"gate.target_fraction={budget}"]
        for mode in ("exit", "pre")
        for budget in (0.35,)
    }
)


FIGURES = (
    "dynamic_top1",
    "dynamic_mean_macs",
    "top1_gain_at_equal_macs",
    "gain_over_cascade",
    "oracle_capture",
    "sweep_min_gain_over_static",
    "sweep_min_gain_over_cascade",
)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_variant(name: str, overrides: list[str], supernet: Path, out: Path, extra: list[str]) -> dict:
    sup = read_checkpoint(supernet)
    seed = sup["config"]["seed"]
    cfg = quickstart_config(overrides=[*extra, f"seed={seed}", *overrides, "log.progress=false"])
    run = out / _slug(name) / f"seed{seed}"
    t0 = time.time()
    if not (run / "summary.json").is_file():
        train_gate(cfg, supernet, run, resume=(run / "last.ckpt").is_file())
    seconds = time.time() - t0
    cached = run / "ablation_result.json"
    if cached.is_file() and cached.stat().st_mtime >= (run / "best.ckpt").stat().st_mtime:
        return json.loads(cached.read_text())
    model, _ = load_model(run / "best.ckpt")
    result = {"variant": name, "seed": seed, "train_seconds": round(seconds, 1)}
    for split in ("holdout", "val"):
        loader, _ = build_loader(cfg["data"], split, seed=0)
        report = evaluate(model, loader, sweep=11, progress=False)
        result[split] = {k: report["summary"][k] for k in FIGURES}
        result[split]["histogram"] = report["dynamic"]["histogram"]["fractions"]
        result[split]["reachable"] = (report.get("routing") or {}).get("reachable_fraction")
        result[split]["curve"] = [(p["mean_macs"] / 1e6, p["top1"]) for p in report["sweep"]]
        result[split]["static"] = [(p["macs"] / 1e6, p["top1"]) for p in report["static"] if p["routed"]]
        result[split]["cascade"] = [(p["mean_macs"] / 1e6, p["top1"]) for p in report["baselines"]["cascade"]]
    atomic_write_json(result, cached)
    return result


def aggregate(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        row = {"variant": name, "seeds": [r["seed"] for r in runs]}
        for split in ("holdout", "val"):
            for key in FIGURES:
                values = np.array([r[split][key] for r in runs if r[split][key] is not None], dtype=float)
                row[f"{split}/{key}"] = {
                    "mean": float(values.mean()) if len(values) else None,
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                }
            row[f"{split}/histogram"] = np.mean([r[split]["histogram"] for r in runs], axis=0).round(3).tolist()
        rows.append(row)
    return rows


def render(rows: list[dict], split: str) -> str:
    def ms(v: dict, scale: float = 1.0) -> str:
        return "-" if v["mean"] is None else f"{v['mean'] * scale:.2f} ±{v['std'] * scale:.2f}"

    table = [
        [
            r["variant"],
            ms(r[f"{split}/dynamic_top1"]),
            ms(r[f"{split}/dynamic_mean_macs"], 1e-6),
            ms(r[f"{split}/top1_gain_at_equal_macs"]),
            ms(r[f"{split}/gain_over_cascade"]),
            ms(r[f"{split}/oracle_capture"], 100.0),
            ms(r[f"{split}/sweep_min_gain_over_static"]),
            ms(r[f"{split}/sweep_min_gain_over_cascade"]),
            " ".join(f"{v:.2f}" for v in r[f"{split}/histogram"]),
        ]
        for r in rows
    ]
    headers = [
        "variant", "top-1 %", "MMACs", "vs static", "vs cascade", "oracle gain %", "worst vs static",
        "worst vs cascade", "routing",
    ]  # fmt: skip
    title = f"{'held-out training images (selection)' if split == 'holdout' else 'test split (reported)'}"
    return format_table(headers, table, title=title + ": mean ±std over seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernets", nargs="+", required=True, type=Path, help="stage I checkpoints, one per seed")
    parser.add_argument("--out", type=Path, default=Path("runs/gate_ablation"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    results = []
    for name in names:
        for supernet in args.supernets:
            print(f"[ablation] {name} on {supernet}", flush=True)
            results.append(run_variant(name, VARIANTS[name], supernet, args.out, args.extra))
            atomic_write_json({"results": results}, args.out / "ablation.json")
    rows = aggregate(results)
    atomic_write_json({"results": results, "aggregate": rows}, args.out / "ablation.json")
    print(render(rows, "holdout"))
    print()
    print(render(rows, "val"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
