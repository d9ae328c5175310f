"""Stage I ablation: which teacher makes the supernet's sub-networks at least as good as the same widths alone.

Every variant trains the quickstart's supernet (``--fast``: 25,600 images, 3 epochs; full: 6 epochs) on the same
data and schedule; the networks trained alone at each routed width use the same data, epochs and optimiser.
Selection numbers are on the held-out training slice (``data.holdout``), reported numbers on the test split,
read once per trained network. Mean and std over seeds.

    python scripts/supernet_ablation.py --fast --seeds 0,1,2 --out runs/ablation_fast
    python scripts/supernet_ablation.py --variants none,ib --seeds 0,1,2 --out runs/ablation_full

Writes ``ablation.json`` and ``ablation.md`` in ``--out``; finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dsnet.baselines.alone import alone_config, alone_widths
from dsnet.data import build_loader
from dsnet.quickstart import quickstart_config
from dsnet.train.checkpoint import load_model
from dsnet.train.run import top1_accuracy
from dsnet.train.supernet import train_supernet

VARIANTS: dict[str, list[str]] = {
    # the paper's in-place bootstrapping: students learn from the EMA teacher (BN statistics averaged, as timm)
    "ib": ["supernet.distill=ib"],
    # the same with the student's BN statistics copied into the teacher (dsnet before the fix)
    "ib_copy_bn": ["supernet.distill=ib", "supernet.ema_buffers=copy"],
    # every sandwich member on the labels
    "none": ["supernet.distill=none"],
    # students: half labels, half EMA teacher [ours]
    "ib_mix": ["supernet.distill=ib", "supernet.distill_label_weight=0.5"],
    # US-Nets' in-place distillation: the largest's own detached prediction
    "inplace": ["supernet.distill=inplace"],
    # labels only, residual branches not zero-initialised
    "none_no_zero_init": ["supernet.distill=none", "model.kwargs={zero_init_residual: false}"],
}
HOLDOUT = {True: 2500, False: 5000}


def _evaluate(ckpt: Path, cfg: dict, indices: list[int] | None) -> dict[str, list[float]]:
    model, _ = load_model(ckpt)
    device = torch.device("cpu")
    out = {}
    for split in ("holdout", "val"):
        loader, _ = build_loader(cfg["data"], split, seed=cfg["seed"], device=device)
        ks = indices if indices is not None else list(model.routing_space)
        out[split] = [top1_accuracy(model, loader, device, subnet=k) for k in ks]
    return out


def _train(cfg: dict, out: Path) -> float:
    if (out / "summary.json").is_file():
        return json.loads((out / "timing.json").read_text())["seconds"] if (out / "timing.json").is_file() else 0.0
    t0 = time.time()
    train_supernet(cfg, out, resume=(out / "last.ckpt").is_file())
    seconds = time.time() - t0
    (out / "timing.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true")
    p.add_argument("--seeds", default="0")
    p.add_argument("--variants", default="ib,none,ib_mix,inplace")
    p.add_argument("--out", required=True)
    p.add_argument("--no-alone", action="store_true", help="skip the networks trained alone")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results_path = out / "ablation.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    log = ["log.progress=false", "log.tensorboard=false"]
    for seed in seeds:
        base = [f"data.holdout={HOLDOUT[args.fast]}", f"seed={seed}", *log, *args.overrides]
        for name in [*([] if args.no_alone else ["alone"]), *variants]:
            key = f"{name}/seed{seed}"
            if key in results:
                continue
            if name == "alone":
                cfg0 = quickstart_config(args.fast, None, base)
                widths = alone_widths(cfg0, 10, 1)
                rows = {"holdout": [], "val": [], "seconds": 0.0}
                for k, w in enumerate(widths):
                    cfg = alone_config(cfg0, w)
                    run = out / "alone" / f"seed{seed}" / f"net{k}"
                    rows["seconds"] += _train(cfg, run)
                    r = _evaluate(run / "best.ckpt", cfg, [0])
                    rows["holdout"] += r["holdout"]
                    rows["val"] += r["val"]
            else:
                cfg = quickstart_config(args.fast, None, base + VARIANTS[name])
                run = out / name / f"seed{seed}"
                seconds = _train(cfg, run)
                rows = {**_evaluate(run / "best.ckpt", cfg, None), "seconds": seconds}
            results[key] = rows
            out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{key}: holdout {rows['holdout']} test {rows['val']} ({rows['seconds']:.0f} s)", flush=True)
    (out / "ablation.md").write_text(table(results))
    print(table(results))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: dict) -> str:
    names = sorted({k.split("/")[0] for k in results}, key=lambda n: (n != "alone", n))
    lines = [
        "| stage I | seeds | held-out top-1 per routed width | test top-1 per routed width | test vs alone (mean over"
        " widths) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = {k.split("/")[1]: v for k, v in results.items() if k.split("/")[0] == name}
        seeds = sorted(runs)
        width = len(next(iter(runs.values()))["val"])
        cells = []
        for split in ("holdout", "val"):
            cells.append(" / ".join(_mean_std([runs[s][split][j] for s in seeds]) for j in range(width)))
        gaps = []
        for s in seeds:
            alone = results.get(f"alone/{s}")
            if alone and name != "alone":
                gaps.append(statistics.mean(a - b for a, b in zip(runs[s]["val"], alone["val"], strict=True)))
        gap = _mean_std(gaps) if gaps else ""
        secs = statistics.mean(runs[s]["seconds"] for s in seeds)
        lines.append(f"| {name} | {','.join(seeds)} | {cells[0]} | {cells[1]} | {gap} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
