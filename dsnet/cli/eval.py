"""``dsnet eval``: accuracy and compute of a checkpoint's sub-networks, its gate, and a gate-bias budget sweep.

The data comes from the checkpoint's own resolved ``data`` config (the run
evaluates on what it was trained for), with command-line overrides for the
location, dataset, subset and batch size.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import TYPE_CHECKING, Any

from dsnet.cli._args import Subcommands, allow_negative_values, device_name, nonnegative_int, output_file, positive_int

if TYPE_CHECKING:
    import torch


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: static sub-networks, dynamic routing, gate-bias sweep",
        description=(
            "Evaluate every sub-network of a checkpoint, its dynamic (gated) inference and a sweep of the gate "
            "bias b (gate bias vector = b * linspace(+1, -1, R): b > 0 favours slimmer sub-networks) in one pass "
            "over the validation data."
        ),
    )
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
    p.add_argument(
        "--latency-table",
        metavar="FILE",
        help="a latency table (dsnet bench --latency-table): report ms per image next to MACs, per routing choice, "
        "for the dynamic point and the sweep (expected: sum of share x ms)",
    )
    p.add_argument(
        "--latency-batch-size",
        type=positive_int,
        metavar="B",
        help="the table's row: batch size (default: its only one)",
    )
    p.add_argument(
        "--latency-runtime", choices=["eager", "onnx"], default=None, help="the table's row: runtime (default eager)"
    )
    p.add_argument(
        "--latency-foreign",
        action="store_true",
        help="use a table measured on another machine, thread count, runtime or model (warns instead of an error)",
    )
    p.add_argument("--json", metavar="FILE", type=output_file, help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE", type=output_file, help="write a top-1 vs MMACs plot (PNG)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    allow_negative_values(p, "--biases")  # "--biases -2,-1,0": argparse alone takes "-2,-1,0" for an option
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
    import torch

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
    from dsnet.evaluation.text import format_report
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
    latency = None
    if args.latency_table:  # checked before the evaluation: a table for another setting fails at once
        from dsnet.utils.latency import LatencyTable

        table = LatencyTable.load(args.latency_table)
        row = table.resolve(
            model,
            (info.in_chans, info.image_size, info.image_size),
            batch_size=args.latency_batch_size,
            runtime=args.latency_runtime,
            allow_foreign=args.latency_foreign,
        )
        latency = (table, row)
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
    if latency is not None:
        from dsnet.evaluation.latency import format_latency_report, latency_entry

        report["latency"] = latency_entry(report, *latency)
        print()
        print(format_latency_report(report["latency"]))
    if args.json:
        atomic_write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _say_what_no_ema_loads(path: str, ckpt: dict[str, Any]) -> None:
    """``--no-ema`` picks the raw weights; say so when that is no different from the default."""
    import torch

    ema, raw = ckpt.get("ema_state_dict"), ckpt["state_dict"]
    if not ema:
        print(f"note: {path} has no separate EMA weights (a {ckpt.get('stage') or 'dsnet'} checkpoint): "
              "--no-ema loads the same weights as without it", file=sys.stderr, flush=True)  # fmt: skip
    elif ema.keys() == raw.keys() and all(torch.equal(ema[k], raw[k]) for k in raw):
        print(f"note: {path}: its EMA weights equal its raw weights: --no-ema changes nothing",
              file=sys.stderr, flush=True)  # fmt: skip
