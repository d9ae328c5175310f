"""``dsnet quickstart``: the whole method on Fashion-MNIST in minutes, ending with "did it work?".

Stage I trains the supernet (sandwich rule + in-place bootstrapping), BN
statistics are recalibrated per sub-network, stage II trains the gate (SGS +
task + MACs losses), then the run is evaluated (static curve, dynamic
accuracy, a budget sweep of the gate bias) and timed (dynamic routing against
the widest routed sub-network, interleaved). A re-run with the same ``--out``
continues where the last one stopped: finished stages are reused, an
interrupted one resumes.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dsnet.evaluation import routed_curve
from dsnet.train.config import apply_overrides, resolve_config
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table

__all__ = ["QUICKSTART", "FAST", "quickstart_config", "run_quickstart", "run_seeds", "aggregate_seeds"]

# The recipe. Every choice here was measured: see docs/results.md "Quickstart results".
QUICKSTART: dict[str, Any] = {
    "seed": 0,
    "model": {"name": "ds_resnet8_tiny", "kwargs": {}},
    # 5,000 training images are held out: epochs and the budget bias are chosen on them, never on the test split
    "data": {"dataset": "fashion_mnist", "holdout": 5000, "batch_size": 128, "eval_batch_size": 500, "workers": 0},
    "supernet": {
        "epochs": 6,
        "lr": 0.2,
        "lr_reference_batch": 256,
        "weight_decay": 5.0e-5,
        "warmup_epochs": 1,
        "num_random": 2,
        # labels for every sandwich member: chosen on held-out images (scripts/supernet_ablation.py;
        # docs/results.md "The current recipe"); the paper's EMA teacher (ib) costs 2-3 points at this length
        "distill": "none",
        "ema_decay": 0.995,
        "bn_calibration_batches": 40,
    },
    "gate": {
        "epochs": 3,
        "lr": 0.5,
        "lr_reference_batch": 256,
        "weight_decay": 0.0,
        "macs_weight": 0.5,
        "macs_unit": "relative",
        # chosen on held-out training images over 3 seeds (scripts/gate_ablation.py;
        # docs/results.md "Every gate we tried"):
        # the early-exit gate, cheapest-correct SGS targets, 35% of the widest routed sub-network's MACs
        "mode": "exit",
        "sgs_targets": "cheapest",
        "target_fraction": 0.35,
    },
    "log": {"tensorboard": False},
}

# --fast: 25,600 training images, 3 + 1 epochs (~600 supernet steps; accuracy lower, the pipeline is the same)
FAST: list[str] = [
    "data.train_subset=25600",
    "supernet.epochs=3",
    "supernet.bn_calibration_batches=10",
    "gate.epochs=1",
]


def quickstart_config(fast: bool = False, data: str | None = None, overrides: list[str] | None = None) -> dict:
    extra = list(FAST if fast else [])
    if data:
        extra.append(f"data.root={data}")
    return resolve_config(apply_overrides(copy.deepcopy(QUICKSTART), extra + list(overrides or [])))


def _fill_unset(new: Any, old: Any) -> Any:
    """``new`` with its unset (None) values taken from ``old``: a run records what "auto" resolved to."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _fill_unset(v, old[k]) if k in old else v for k, v in new.items()}
    return old if new is None else new


def _stage(
    name: str, out: Path, run, fresh_msg: str, cfg: dict[str, Any], ignore: tuple[str, ...] = ()
) -> tuple[float, str]:
    """Run a stage, or reuse/resume it from ``out``.

    A finished stage is reused only if it was trained with this recipe (up to
    the sections in ``ignore``, which it does not read): a changed recipe never
    silently reuses a stale result.
    """
    from dsnet.train.run import config_difference

    t0 = time.time()
    if (out / "summary.json").is_file():
        saved = out / "config.yaml"
        old = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
        old = {k: v for k, v in (old or {}).items() if k not in ignore}
        diff = config_difference(old, _fill_unset({k: v for k, v in cfg.items() if k not in ignore}, old))
        if diff:
            key, was, now = diff
            raise ValueError(
                f"{out} was trained with {key}={was!r} but the recipe now says {now!r}; "
                f"choose another --out (or remove {out} to train it again)"
            )
        print(f"[quickstart] {name}: reusing finished run in {out}")
        return 0.0, "reused"
    resume = (out / "last.ckpt").is_file()
    print(f"[quickstart] {name}: {'resuming' if resume else fresh_msg} -> {out}", flush=True)
    run(resume)
    return time.time() - t0, "resumed" if resume else "trained"


def _measure_speed(model, loader, device: torch.device, repeats: int, batches: int = 2) -> dict[str, Any]:
    """Dynamic routing vs the widest routed sub-network on real test images, interleaved."""
    from dsnet.bench.timing import interleaved, summarize

    model.eval()
    images = []
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        images.append(x.to(device))
    x = torch.cat(images)
    widest = model.routing_space[-1]
    static_widest = model.extract(widest, inplace=True).eval()  # as fast as the dynamic model's plans
    with torch.inference_mode():
        choice = model(x, return_routing=True).choice
        table = model.subnet_macs(tuple(x.shape[1:]))
        mean_macs = float(model.routing_macs(tuple(x.shape[1:]))[choice.cpu()].mean())
        samples = interleaved(
            {
                "dynamic": lambda: model(x),
                "widest_sliced": lambda: model(x, subnet=widest),
                "widest_static": lambda: static_widest(x),
            },
            repeats=repeats,
            warmup=2,
            device=device,
        )
    stats = {k: summarize(v) for k, v in samples.items()}
    real = stats["widest_static"].median / stats["dynamic"].median
    theory = table[widest] / mean_macs
    return {
        "batch_size": len(x),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "median_ms": {k: s.median for k, s in stats.items()},
        "iqr_ms": {k: s.iqr for k, s in stats.items()},
        "real_speedup": real,
        "theoretical_speedup": theory,
        "efficiency": real / theory,
    }


def run_quickstart(
    out: str | Path = "runs/quickstart",
    fast: bool = False,
    data: str | None = None,
    overrides: list[str] | None = None,
    speed_repeats: int = 15,
    alone: bool = True,
) -> dict[str, Any]:
    """Train, calibrate, train the gate, evaluate, time. Returns (and writes) ``quickstart.json``.

    ``alone=False`` skips the baseline of the routed widths trained alone (the costliest part for a family
    with many routing choices); the report's ``alone`` list is then empty and no claim is made against it.
    """
    from dsnet.baselines.alone import alone_config, alone_kernels, alone_widths
    from dsnet.data import build_dataset, build_loader, describe_split_sizes, holdout_size, training_images
    from dsnet.evaluation import evaluate, plot_report
    from dsnet.train.checkpoint import load_model
    from dsnet.train.gate import train_gate
    from dsnet.train.supernet import train_supernet

    cfg = quickstart_config(fast, data, overrides)
    out = Path(out)
    t_start = time.time()
    # fail in a second, with instructions, if the data is not there
    _, info = build_dataset(cfg["data"], "val")
    train_info = build_dataset(cfg["data"], "train")[1]
    held_out = holdout_size(cfg["data"]["holdout"], training_images(cfg["data"]))
    print(
        f"[quickstart] {cfg['model']['name']} on {info.name}: "
        f"{describe_split_sizes(train_info.num_samples, held_out, info.num_samples)}{' (--fast)' if fast else ''}",
        flush=True,
    )
    sup_dir, gate_dir = out / "supernet", out / "gate"
    t_sup, how_sup = _stage(
        "stage I (supernet + BN recalibration)",
        sup_dir,
        lambda resume: train_supernet(cfg, sup_dir, resume=resume),
        f"training {cfg['supernet']['epochs']} epochs",
        cfg,
        ignore=("gate", "lcnet"),
    )
    # the same widths trained alone, same data, epochs and optimiser: the baseline weight sharing must beat
    t_alone, how_alone = 0.0, []
    shape = (train_info.num_classes, train_info.in_chans)
    routed = (alone_widths(cfg, *shape), alone_kernels(cfg, *shape)) if alone else ([], [])
    for k, (widths, kernels) in enumerate(zip(*routed)):  # kernels: families that slice kernel sizes too
        alone_cfg, alone_dir = alone_config(cfg, widths, kernels), out / "alone" / f"net{k}"
        t, how = _stage(
            f"routed width #{k} {widths} trained alone",
            alone_dir,
            lambda resume, c=alone_cfg, d=alone_dir: train_supernet(c, d, resume=resume),
            f"training {cfg['supernet']['epochs']} epochs",
            alone_cfg,
            ignore=("gate", "lcnet"),
        )
        t_alone, how_alone = t_alone + t, [*how_alone, how]
    t_gate, how_gate = _stage(
        "stage II (gate)",
        gate_dir,
        lambda resume: train_gate(cfg, sup_dir / "best.ckpt", gate_dir, resume=resume),
        f"training {cfg['gate']['epochs']} epochs",
        cfg,
        ignore=("lcnet",),
    )
    device = torch.device("cpu")
    model, _ = load_model(gate_dir / "best.ckpt")
    val_loader, _ = build_loader(cfg["data"], "val", seed=cfg["seed"])
    holdout_loader, _ = build_loader(cfg["data"], "holdout", seed=cfg["seed"])
    print("[quickstart] choosing the operating point on held-out training images", flush=True)
    t0 = time.time()
    selection = evaluate(model, holdout_loader, sweep=11, progress=False, split="holdout")
    biases = [p["bias"] for p in selection["sweep"]]
    print("[quickstart] evaluating static sub-networks, dynamic routing and the budget sweep on the test split")
    report = evaluate(
        model,
        val_loader,
        biases=biases,
        progress=False,
        model_name=cfg["model"]["name"],
        dataset_name=info.name,
        class_names=info.class_names,
        split="test",
    )
    alone_points = []
    for k in range(len(how_alone)):  # each network trained alone, on the same test images, read once
        net, _ = load_model(out / "alone" / f"net{k}" / "best.ckpt")
        static = evaluate(net, val_loader, sweep=2, progress=False, split="test")["static"][0]
        alone_points.append({"index": k, "widths": static["widths"], "macs": static["macs"], "top1": static["top1"]})
    report["alone"] = alone_points
    atomic_write_json(report, out / "report.json")
    plot_report(report, out / "report.png")
    t_eval = time.time() - t0
    print("[quickstart] timing dynamic routing against the widest routed sub-network", flush=True)
    speed = _measure_speed(model, val_loader, device, speed_repeats)
    summary = _summarize(report, speed, selection)
    result = {
        "config": cfg,
        "fast": fast,
        "timings_s": {
            "supernet": round(t_sup, 1),
            "alone": round(t_alone, 1),
            "gate": round(t_gate, 1),
            "evaluation": round(t_eval, 1),
            "total": round(time.time() - t_start, 1),
        },
        "stages": {"supernet": how_sup, "alone": how_alone, "gate": how_gate},
        "claims": summary,
        "speed": speed,
        "files": {
            "report": str(out / "report.json"),
            "plot": str(out / "report.png"),
            "supernet": str(sup_dir / "best.ckpt"),
            "gate": str(gate_dir / "best.ckpt"),
        },
    }
    atomic_write_json(result, out / "quickstart.json")
    print(render(report, result))
    return result


def _matching_point(report: dict[str, Any]) -> dict[str, Any] | None:
    """The cheapest sweep point within 0.3 points of the widest routed sub-network (of the same report)."""
    widest = report["summary"]["widest_routed"]
    best = None
    for point in report["sweep"]:
        if point["top1"] >= widest["top1"] - 0.3 and (best is None or point["mean_macs"] < best["mean_macs"]):
            best = point
    return best


def _summarize(report: dict[str, Any], speed: dict[str, Any], selection: dict[str, Any] | None = None) -> dict:
    """The method's claims, checked on this run: the widest's accuracy at fewer MACs, and the gate against the
    static curve, the confidence cascade, the networks trained alone, the random router and the oracle at its
    own MACs. The matching operating point is chosen on ``selection`` (the held-out report), with the same
    biases as ``report``, whose numbers at that bias are the ones reported."""
    widest = report["summary"]["widest_routed"]
    chosen = _matching_point(selection if selection is not None else report)
    best = None if chosen is None else next(p for p in report["sweep"] if p["bias"] == chosen["bias"])
    alone = report.get("alone") or []
    alone_at = None
    dyn_macs = report["summary"]["dynamic_mean_macs"]
    if alone:
        a_macs, a_top1 = [a["macs"] for a in alone], [a["top1"] for a in alone]
        if a_macs[0] <= dyn_macs <= a_macs[-1]:
            alone_at = float(np.interp(dyn_macs, a_macs, a_top1))
    macs, accs = routed_curve(report["static"])
    above = [
        p
        for p in report["sweep"]
        if macs[0] <= p["mean_macs"] <= macs[-1] and p["top1"] > np.interp(p["mean_macs"], macs, accs)
    ]
    return {
        "widest_routed_top1": widest["top1"],
        "widest_routed_macs": widest["macs"],
        "dynamic_top1": report["summary"]["dynamic_top1"],
        "dynamic_mean_macs": report["summary"]["dynamic_mean_macs"],
        "mac_reduction": report["summary"]["mac_reduction"],
        "gain_over_static_curve": report["summary"]["top1_gain_at_equal_macs"],
        "matches_widest_at_fewer_macs": best is not None
        and best["top1"] >= widest["top1"] - 0.3
        and widest["macs"] / best["mean_macs"] >= 1.5,
        "best_matching_point": None
        if best is None
        else {
            "bias": best["bias"],
            "top1": best["top1"],
            "mac_reduction": widest["macs"] / best["mean_macs"],
            "chosen_on": "holdout" if selection is not None else "test",
        },
        "alone_top1": [a["top1"] for a in alone],
        "alone_top1_at_dynamic_macs": alone_at,
        "gain_over_alone": None if alone_at is None else report["summary"]["dynamic_top1"] - alone_at,
        "static_minus_alone": [s["top1"] - a["top1"] for s, a in zip(_routed_static(report), alone, strict=False)],
        "sweep_points_above_static_curve": len(above),
        "sweep_points": len(report["sweep"]),
        "static_top1_at_dynamic_macs": report["summary"]["static_top1_at_dynamic_macs"],
        "cascade_top1_at_dynamic_macs": report["summary"]["cascade_top1_at_dynamic_macs"],
        "gain_over_cascade": report["summary"]["gain_over_cascade"],
        "oracle_top1_at_dynamic_macs": report["summary"]["oracle_top1_at_dynamic_macs"],
        "oracle_capture": report["summary"]["oracle_capture"],
        "random_router_top1": report["summary"]["random_router"]["top1"],
        "sweep_min_gain_over_static": report["summary"]["sweep_min_gain_over_static"],
        "sweep_min_gain_over_cascade": report["summary"]["sweep_min_gain_over_cascade"],
        "real_speedup": speed["real_speedup"],
        "theoretical_speedup": speed["theoretical_speedup"],
    }


def _routed_static(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in report["static"] if s["in_routing_space"]]


def render(report: dict[str, Any], result: dict[str, Any]) -> str:
    """The final screen."""
    c = result["claims"]
    t = result["timings_s"]
    static_rows = [
        [
            s["index"],
            " ".join(
                f"{k}={v}" + (f"/{s['kernels'][k]}x{s['kernels'][k]}" if "kernels" in s else "")
                for k, v in s["widths"].items()
            ),
            round(s["macs"] / 1e6, 2),
            s["top1"],
            "routed" if s["in_routing_space"] else ("training only" if not s["routed"] else ""),
        ]
        for s in report["static"]
    ]
    sweep_rows = [
        [
            p["bias"],
            p["top1"],
            round(p["mean_macs"] / 1e6, 2),
            round(c["widest_routed_macs"] / p["mean_macs"], 2),
            round(p["static_top1_at_macs"], 2),
            round(p["cascade_top1_at_macs"], 2),
            round(p["oracle_top1_at_macs"], 2),
            " ".join(f"{f:.2f}" for f in p["histogram"]["fractions"]),
        ]
        for p in report["sweep"]
    ]
    from dsnet.evaluation.text import format_summary

    ok = "yes" if c["matches_widest_at_fewer_macs"] else "no"
    lines = [
        "",
        "=" * 78,
        f"dsnet quickstart: {report['model']['name']} on {report['dataset']['name']} "
        f"({report['dataset']['num_samples']} test images)",
        f"time: stage I {t['supernet']:.0f}s, stage II {t['gate']:.0f}s, evaluation {t['evaluation']:.0f}s, "
        f"total {t['total']:.0f}s",
        "",
        format_table(["#", "widths", "MMACs", "top-1 %", "role"], static_rows, title="Static sub-networks"),
        "",
        format_table(
            ["gate bias", "top-1 %", "MMACs", "MAC reduction", "static", "cascade", "oracle", "routing (slim -> wide)"],
            sweep_rows,
            title="Dynamic model at several budget settings (bias > 0 favours slim sub-networks), and the\n"
            "baselines' top-1 % at the same MACs: static sub-networks (interpolated), confidence cascade, oracle",
        ),
        "",
        "Did it work?",
        *("  " + line for line in format_summary(report).splitlines()),
    ]
    if c.get("alone_top1"):
        gaps = " ".join(f"{g:+.2f}" for g in c["static_minus_alone"])
        alone = " ".join(f"{a:.2f}" for a in c["alone_top1"])
        lines.append(f"  the same routed widths trained alone (same data, epochs): {alone} %; supernet - alone {gaps}")
        if c["gain_over_alone"] is not None:
            lines.append(
                f"  gate vs networks trained alone at its MACs: {c['gain_over_alone']:+.2f} points "
                f"({c['dynamic_top1']:.2f} vs {c['alone_top1_at_dynamic_macs']:.2f} interpolated)"
            )
    if c["best_matching_point"]:
        b = c["best_matching_point"]
        lines.append(
            f"  widest accuracy (within 0.3) with >=1.5x fewer MACs: {ok} (bias {b['bias']:+.2f}, chosen on "
            f"{b.get('chosen_on', 'test')} images: {b['top1']:.2f}% with {b['mac_reduction']:.2f}x fewer MACs)"
        )
    else:
        lines.append("  widest accuracy (within 0.3) with >=1.5x fewer MACs: no sweep point gets there")
    s = result["speed"]
    lines += [
        f"  measured speed (batch {s['batch_size']}, {s['threads']} threads, {s['device']}): dynamic "
        f"{s['median_ms']['dynamic']:.1f} ms vs widest {s['median_ms']['widest_static']:.1f} ms -> "
        f"{s['real_speedup']:.2f}x real for {s['theoretical_speedup']:.2f}x fewer MACs",
        "",
        f"files: {result['files']['report']}  {result['files']['plot']}",
        f"       {result['files']['supernet']}  {result['files']['gate']}",
        "=" * 78,
    ]
    return "\n".join(lines)


# the headline figures a multi-seed run reports as mean and spread
SEED_FIGURES = (
    "widest_routed_top1",
    "dynamic_top1",
    "dynamic_mean_macs",
    "mac_reduction",
    "static_top1_at_dynamic_macs",
    "gain_over_static_curve",
    "cascade_top1_at_dynamic_macs",
    "gain_over_cascade",
    "oracle_top1_at_dynamic_macs",
    "oracle_capture",
    "random_router_top1",
    "alone_top1_at_dynamic_macs",
    "gain_over_alone",
    "sweep_min_gain_over_static",
    "sweep_min_gain_over_cascade",
    "real_speedup",
)


def aggregate_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of every headline figure over seeds (None values skipped)."""
    figures: dict[str, Any] = {}
    for key in SEED_FIGURES:
        values = [r["claims"][key] for r in results if r["claims"].get(key) is not None]
        if values:
            a = np.asarray(values, dtype=np.float64)
            figures[key] = {
                "mean": float(a.mean()),
                "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                "min": float(a.min()),
                "max": float(a.max()),
                "values": [float(v) for v in a],
            }
    static: dict[int, list[float]] = {}
    for r in results:
        for s in r["static"]:
            static.setdefault(s["index"], []).append(s["top1"])
    figures["static_top1"] = {
        str(k): {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
        for k, v in static.items()
    }
    return {"seeds": [r["config"]["seed"] for r in results], "figures": figures}


def run_seeds(
    out: str | Path = "runs/quickstart",
    seeds: int = 3,
    fast: bool = False,
    data: str | None = None,
    overrides: list[str] | None = None,
    speed_repeats: int = 15,
) -> dict[str, Any]:
    """The quickstart for seeds ``0..seeds-1`` (``out/seed<i>``, each resumable), then mean and spread.

    Writes ``out/seeds.json`` and prints one table; accuracy differences under
    ~0.5 point on one seed are noise, so claims quote these means.
    """
    if seeds < 1:
        raise ValueError(f"--seeds needs at least 1, got {seeds}")
    out = Path(out)
    results = []
    for seed in range(seeds):
        print(f"[quickstart] seed {seed + 1}/{seeds}", flush=True)
        result = run_quickstart(out / f"seed{seed}", fast, data, [*(overrides or []), f"seed={seed}"], speed_repeats)
        report = json.loads(Path(result["files"]["report"]).read_text())
        results.append({**result, "static": report["static"]})
    summary = aggregate_seeds(results)
    summary["fast"] = fast
    atomic_write_json(summary, out / "seeds.json")
    print(render_seeds(summary))
    return summary


def render_seeds(summary: dict[str, Any]) -> str:
    f = summary["figures"]
    names = {
        "widest_routed_top1": "widest routed sub-network, top-1 %",
        "dynamic_top1": "trained gate (b=0), top-1 %",
        "dynamic_mean_macs": "trained gate, mean MACs",
        "mac_reduction": "MAC reduction vs the widest routed",
        "static_top1_at_dynamic_macs": "static curve at the gate's MACs, top-1 %",
        "gain_over_static_curve": "gate - static curve (points)",
        "cascade_top1_at_dynamic_macs": "confidence cascade at the gate's MACs, top-1 %",
        "gain_over_cascade": "gate - cascade (points)",
        "oracle_top1_at_dynamic_macs": "oracle at the gate's MACs, top-1 %",
        "oracle_capture": "share of the oracle's gain captured",
        "random_router_top1": "random router with the gate's mix, top-1 %",
        "sweep_min_gain_over_static": "worst sweep point - static curve",
        "sweep_min_gain_over_cascade": "worst sweep point - cascade",
        "real_speedup": "measured speed-up vs the widest (batch 1000)",
    }
    rows = []
    for key, label in names.items():
        if key in f:
            scale = 1e-6 if key == "dynamic_mean_macs" else 1.0
            v = f[key]
            rows.append(
                [
                    label,
                    f"{v['mean'] * scale:.3f}",
                    f"{v['std'] * scale:.3f}",
                    " ".join(f"{x * scale:.2f}" for x in v["values"]),
                ]
            )
    title = f"Quickstart over seeds {summary['seeds']}{' (--fast)' if summary.get('fast') else ''}: mean, std, values"
    return "\n" + format_table(["figure", "mean", "std", "per seed"], rows, title=title)
