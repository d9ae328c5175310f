"""``dsnet eval``: accuracy and compute of a checkpoint's sub-networks, its gate, and a gate-bias budget sweep.

The data comes from the checkpoint's own resolved ``data`` config (the run
evaluates on what it was trained for), with command-line overrides for the
location, dataset, subset and batch size.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from typing import Any

import torch

from dsnet.cli._args import device_name, nonnegative_int, output_file, positive_int
from dsnet.utils.table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: static sub-networks, dynamic routing, gate-bias sweep",
        description=(
            "Evaluate every sub-network of a checkpoint, its dynamic (gated) inference and a sweep of the gate "
            "bias b (gate bias vector = b * linspace(+1, -1, R): b > 0 favours slimmer sub-networks) in one pass "
            "over the validation data."
        ),
    )
    # let "--biases -2,-1,0" through: argparse otherwise takes "-2,-1,0" for an option (it only knows "-2")
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+\-]*$")
    p.add_argument("--checkpoint", required=True, help="a dsnet checkpoint (e.g. runs/x/best.ckpt)")
    p.add_argument("--data", metavar="DIR", help="dataset root (overrides the checkpoint's data.root)")
    p.add_argument("--dataset", metavar="NAME", help="dataset (overrides the checkpoint's data.dataset)")
    p.add_argument("--subset", type=positive_int, metavar="N", help="evaluate a fixed subset of N validation images")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="evaluation batch size")
    p.add_argument("--workers", type=nonnegative_int, metavar="W", help="data-loading workers")
    bias = p.add_mutually_exclusive_group()
    bias.add_argument(
        "--biases", type=_parse_biases, metavar="B1,B2,..", help="explicit sweep biases, e.g. --biases -2,-1,0,1,2"
    )
    bias.add_argument(
        "--sweep",
        type=positive_int,
        default=21,
        metavar="N",
        help="N biases chosen from the gate's logits (default 21)",
    )
    p.add_argument("--json", metavar="FILE", type=output_file, help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE", type=output_file, help="write a top-1 vs MMACs plot (PNG)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _parse_biases(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one bias")
    return values


def data_config(ckpt: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint's ``data`` section with the command line's overrides applied."""
    config = ckpt.get("config") or {}
    cfg = copy.deepcopy(config.get("data") or {})
    if not cfg and not args.dataset:
        raise ValueError(f"{args.checkpoint} records no data config: pass --dataset (and --data)")
    overrides = {
        "root": args.data,
        "dataset": args.dataset,
        "val_subset": args.subset,
        "eval_batch_size": args.batch_size,
        "workers": args.workers,
    }
    if args.dataset and cfg.get("dataset") and _canonical(cfg["dataset"]) != _canonical(args.dataset):
        cfg.pop("root", None)  # another dataset's location would be wrong for this one
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    from dsnet.data.recipe import with_recorded_recipe

    return with_recorded_recipe(cfg, ckpt.get("dataset"))  # normalise and crop as training did


def _canonical(dataset: str) -> str:
    """The data package's canonical dataset name (``cifar-10`` -> ``cifar10``), or the name as given."""
    try:
        from dsnet.data.config import resolve_data_config

        return resolve_data_config({"dataset": dataset})["dataset"]
    except (ImportError, ValueError):
        return dataset


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # headless: the plot is only ever written to a file

    from dsnet.evaluation import evaluate, plot_report
    from dsnet.models.base import DynamicNet
    from dsnet.train.checkpoint import load_model
    from dsnet.utils.io import atomic_write_json

    device = _device(args.device)
    model, ckpt = load_model(args.checkpoint, use_ema=not args.no_ema, map_location=device)
    if not isinstance(model, DynamicNet):
        raise ValueError(f"{args.checkpoint} holds a {type(model).__name__}, not a dynamic dsnet model")
    name = ckpt["model"]["name"]
    if args.no_ema:
        _say_what_no_ema_loads(args.checkpoint, ckpt)
    cfg = data_config(ckpt, args)

    from dsnet.data import build_loader

    loader, info = build_loader(cfg, "val", seed=0, device=str(device))
    from dsnet.data.recipe import describe_recipe

    print(describe_recipe(info.recipe), flush=True)
    if info.num_classes != model.num_classes:
        raise ValueError(f"{info.name} has {info.num_classes} classes but the model has {model.num_classes}")
    if info.in_chans != model.in_chans:
        raise ValueError(f"{info.name} has {info.in_chans}-channel images but the model takes {model.in_chans}")
    from dsnet.data import check_class_names

    check_class_names(ckpt.get("dataset"), info.class_names, args.checkpoint, f"{info.name} ({cfg.get('root')})")
    report = evaluate(
        model,
        loader,
        biases=args.biases,
        sweep=args.sweep,
        device=device,
        progress=not args.no_progress and sys.stderr.isatty(),
        model_name=name,
        dataset_name=info.name,
        class_names=list(info.class_names) if info.class_names else None,
    )
    report["checkpoint_stage"] = ckpt.get("stage")  # "supernet": the gate was never trained
    print(format_report(report))
    if args.json:
        atomic_write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _say_what_no_ema_loads(path: str, ckpt: dict[str, Any]) -> None:
    """``--no-ema`` picks the raw weights; say so when that is no different from the default."""
    ema, raw = ckpt.get("ema_state_dict"), ckpt["state_dict"]
    if not ema:
        print(f"note: {path} has no separate EMA weights (a {ckpt.get('stage') or 'dsnet'} checkpoint): "
              "--no-ema loads the same weights as without it", file=sys.stderr, flush=True)  # fmt: skip
    elif ema.keys() == raw.keys() and all(torch.equal(ema[k], raw[k]) for k in raw):
        print(f"note: {path}: its EMA weights equal its raw weights: --no-ema changes nothing",
              file=sys.stderr, flush=True)  # fmt: skip


def _gate_label(report: dict[str, Any]) -> str:
    """Dynamic inference's label: "trained gate", unless a stage I checkpoint (its gate head never trained)."""
    if report.get("checkpoint_stage") == "supernet":
        return "untrained gate: a supernet checkpoint, run `dsnet train gate`"
    return "trained gate"


def _pm(value: float, pm: float | None, signed: bool = False) -> str:
    """``value ±pm`` (the 95% half-width; reports of an older dsnet have none: the value alone)."""
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text if pm is None else f"{text} ±{pm:.2f}"


def _count_pm(top1: float, n: int) -> float:
    """The 95% Wilson half-width of a top-1 (%) measured on ``n`` images."""
    from dsnet.evaluation.stats import top1_interval

    return top1_interval(round(top1 * n / 100.0), n).half_width


def _pct(fractions: list[float]) -> str:
    return " / ".join(f"{100 * f:.0f}" for f in fractions)


def format_report(report: dict[str, Any]) -> str:
    """The report as console tables: static sub-networks, dynamic routing (overall and per class), the sweep."""
    k = report["top5_k"]
    choices = report["routing_choices"]
    size = "x".join(str(v) for v in report["input_size"])
    ds = report["dataset"]
    out = []
    rows = [
        [
            s["index"],
            " ".join(f"{n}={w}" for n, w in s["widths"].items()),
            round(s["macs"] / 1e6, 2),
            _pm(s["top1"], s.get("top1_pm95")),
            round(s["top5"], 2),
            "gate choice" if s["in_routing_space"] else ("routed" if s["routed"] else "training only"),
        ]
        for s in report["static"]
    ]
    title = f"{report['model']['name']} on {ds['name']} {ds['split']} ({ds['num_samples']} images, {size})"
    title += "; ± = 95% interval"
    out.append(format_table(["#", "widths", "MMACs", "top-1 %", f"top-{k} %", "role"], rows, title=title))

    dyn = report["dynamic"]
    rows = [
        [c["choice"], c["subnet"], round(c["macs"] / 1e6, 2), n, round(100 * f, 1)]
        for c, n, f in zip(choices, dyn["histogram"]["counts"], dyn["histogram"]["fractions"])
    ]
    title = (
        f"dynamic ({_gate_label(report)}, b=0): "
        f"top-1 {_pm(dyn['top1'], dyn.get('top1_pm95'))}%, top-{k} {dyn['top5']:.2f}%, "
        f"mean {dyn['mean_macs'] / 1e6:.2f} MMACs per sample"
    )
    out.append(format_table(["choice", "subnet", "MMACs (+gate)", "samples", "%"], rows, title="\n" + title))

    if len(dyn["per_class"]) <= 20:
        rows = [[c["name"], c["count"], _pct(c["histogram"]["fractions"])] for c in dyn["per_class"]]
        head = "% per choice (" + " / ".join(f"#{c['subnet']}" for c in choices) + ")"
        out.append(format_table(["class", "samples", head], rows, title="\nrouting per class"))
    else:
        out.append(f"\n(routing per class for {len(dyn['per_class'])} classes: see the JSON report)")

    rows = [
        [
            f"{p['bias']:+.4g}",
            _pm(p["top1"], p.get("top1_pm95")),
            round(p["top5"], 2),
            round(p["mean_macs"] / 1e6, 2),
            _pm(p["top1"] - p["static_top1_at_macs"], p.get("gain_over_static_pm95"), signed=True),
            _pm(p["top1"] - p["cascade_top1_at_macs"], p.get("gain_over_cascade_pm95"), signed=True),
            _pct(p["histogram"]["fractions"]),
        ]
        for p in report["sweep"]
    ]
    out.append(
        format_table(
            ["bias", "top-1 %", f"top-{k} %", "mean MMACs", "vs static", "vs cascade", "% per choice"],
            rows,
            title="\ngate-bias sweep (gate bias = b * " + str([round(r, 3) for r in report["bias_ramp"]]) + ")",
        )
    )
    rows = [
        [
            f"{c['threshold']:.3f}",
            _pm(c["top1"], _count_pm(c["top1"], ds["num_samples"])),
            round(c["mean_macs"] / 1e6, 2),
            round(100 * c["escalated"], 1),
        ]
        for c in report["baselines"]["cascade"]
    ]
    out.append(
        format_table(
            ["threshold", "top-1 %", "mean MMACs", "% escalated"],
            rows,
            title="\nconfidence cascade (no training): slimmest, then the widest when its max softmax < threshold",
        )
    )
    out.append("\n" + format_summary(report))
    return "\n".join(out)


def format_summary(report: dict[str, Any]) -> str:
    """The gate against every baseline at its own MACs, in a few lines (eval and the quickstart print it)."""
    s = report["summary"]
    w = s["widest_routed"]
    rnd = s["random_router"]
    bias = report["model"].get("budget_bias")
    capture = s["oracle_capture"]
    lines = [
        f"gate mode {report.get('gate_mode', 'pre')!r}; stored budget bias "
        + ("none" if bias is None else "[" + ", ".join(f"{b:+.3f}" for b in bias) + "]"),
        f"widest routed #{w['index']}: top-1 {_pm(w['top1'], w.get('top1_pm95'))}% at {w['macs'] / 1e6:.2f} MMACs; "
        f"dynamic ({_gate_label(report)}): {_pm(s['dynamic_top1'], s.get('dynamic_top1_pm95'))}% at "
        f"{s['dynamic_mean_macs'] / 1e6:.2f} MMACs ({s['mac_reduction']:.2f}x fewer MACs); ± = 95% interval",
        f"at {s['dynamic_mean_macs'] / 1e6:.2f} MMACs: gate {s['dynamic_top1']:.2f}% | static curve "
        f"{s['static_top1_at_dynamic_macs']:.2f}% "
        f"({_pm(s['top1_gain_at_equal_macs'], s.get('top1_gain_at_equal_macs_pm95'), signed=True)})"
        + (" [outside the static range: clamped]" if s["interpolation_clamped"] else "")
        + f" | cascade {s['cascade_top1_at_dynamic_macs']:.2f}% "
        f"({_pm(s['gain_over_cascade'], s.get('gain_over_cascade_pm95'), signed=True)})"
        f" | oracle {s['oracle_top1_at_dynamic_macs']:.2f}%"
        + ("; margins: paired 95% intervals" if "top1_gain_at_equal_macs_pm95" in s else ""),
        f"random router with the gate's mix: {rnd['top1']:.2f}% at {rnd['mean_macs'] / 1e6:.2f} MMACs; "
        "share of the oracle's gain over the static curve the gate captures: "
        + ("n/a" if capture is None else f"{100 * capture:.0f}%"),
    ]
    routing = report.get("routing")
    if routing:  # which widths the knob can reach at all (dsnet.evaluation.reachability)
        subnets = [c["subnet"] for c in report["routing_choices"]]
        shares = " / ".join(f"#{k} {100 * f:.0f}%" for k, f in zip(subnets, routing["reachable_fraction"]))
        lines.append(f"router {routing['router']!r}: images each choice wins at some bias b: {shares}")
    worst_static, worst_cascade = s["sweep_min_gain_over_static"], s["sweep_min_gain_over_cascade"]
    if worst_static is not None:
        lines.append(
            f"along the sweep (points inside the static range): worst margin over the static curve "
            f"{_pm(worst_static, s.get('sweep_min_gain_over_static_pm95'), signed=True)}, over the cascade "
            f"{_pm(worst_cascade, s.get('sweep_min_gain_over_cascade_pm95'), signed=True)} points"
        )
    return "\n".join(lines)
