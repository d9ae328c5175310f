"""``dsnet bench``: latency and throughput of sliced, extracted, zero-masked and dynamic inference.

For an LC-Net model (``lc_*``) it runs :mod:`dsnet.bench.lcnet` instead: per-sample channel gather vs a prefix
slice vs zero-masking at equal MACs, and real block skipping.
"""

from __future__ import annotations

import argparse
import math
import sys

from dsnet.cli._args import Subcommands, check_input_size, nonnegative_int, output_file, positive_int
from dsnet.utils.io import atomic_write_json


def _ints(text: str, least: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {least}, got {text!r}")
    return values


def _batch_sizes(text: str) -> list[int]:
    return _ints(text, least=1)


def _unit_fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1] (LC-Net densities and skip fractions)."""
    values = _fractions(text)
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected fractions >= 0 with a positive sum, got {text!r}")
    return values


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("bench", help="measure sliced vs static vs zero-masked vs dynamic inference speed")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model name (random weights)")
    src.add_argument("--checkpoint", help="dsnet checkpoint to load (EMA weights if present)")
    p.add_argument(
        "--gate-mode",
        choices=["exit", "pre"],
        default=None,
        help="--model: the routing head to time (default: the model's: exit with two or more choices; pre: "
        "the paper's)",
    )
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 32], help="comma-separated (default 1,32)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch / onnxruntime intra-op threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--subnets", type=_ints, default=None, help="sub-network indices (default: the routing space)")
    p.add_argument(
        "--mix",
        type=_fractions,
        default=None,
        help="a synthetic routing mix over the routing space, e.g. 0.4,0.3,0.2,0.1 (default with --checkpoint: "
        "the checkpoint's own routing on its data; with --model: 0.4/0.3/0.2/0.1)",
    )
    p.add_argument(
        "--routing-images",
        type=positive_int,
        default=512,
        metavar="N",
        help="--checkpoint: measure its routing on the first N images of its selection split (default 512)",
    )
    p.add_argument("--data", metavar="DIR", help="--checkpoint: dataset root (overrides its recorded data.root)")
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="timed rounds per batch size (default 30 at 1, else 7)"
    )
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--input-size", type=positive_int, default=None, help="image side (default: the model's)")
    p.add_argument("--no-channels-last", action="store_true", help="feed NCHW-contiguous inputs on CPU")
    p.add_argument("--no-masked", action="store_true", help="skip the zero-masking baseline")
    p.add_argument(
        "--onnx", action="store_true", help="also time the static sub-networks and the dynamic bundle in ONNX Runtime"
    )
    p.add_argument(
        "--densities",
        type=_unit_fractions,
        default=None,
        help="LC-Net only: channel densities to compare (default 0.25,0.5,0.75)",
    )
    p.add_argument(
        "--skip-fractions",
        type=_unit_fractions,
        default=None,
        help="LC-Net only: block-skip fractions (default 0.25,0.5,0.75)",
    )
    p.add_argument("--json", metavar="FILE", type=output_file, help="write the full report as JSON")
    p.add_argument(
        "--latency-table",
        metavar="FILE",
        type=output_file,
        help="measure only the latency table: ms per image of each routing choice per batch size (and in ONNX "
        "Runtime with --onnx), on this machine with these threads, written as JSON for gate.target_ms, "
        "calibrate_budget(target_ms=) and dsnet eval --latency-table",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.bench import BenchConfig, format_report, run_benchmark
    from dsnet.models import create_model
    from dsnet.models.base import DynamicNet

    if args.checkpoint:
        if args.gate_mode is not None:
            raise ValueError("--gate-mode applies to --model: a checkpoint is timed with the gate it was trained with")
        from dsnet.train.checkpoint import load_model

        model, ckpt = load_model(args.checkpoint)
        name = ckpt["model"]["name"]
    else:
        model, name = create_model(args.model), args.model
        if args.gate_mode is not None:
            if not isinstance(model, DynamicNet):
                raise ValueError(f"--gate-mode: {name} has no routing gate")
            model.set_gate_mode(args.gate_mode)
    from dsnet.models.lcnet import LCResNet

    if isinstance(model, LCResNet):
        return _run_lcnet(model, name, args)
    if args.densities is not None or args.skip_fractions is not None:
        raise ValueError("--densities and --skip-fractions apply to LC-Net models only")
    if not isinstance(model, DynamicNet):
        raise ValueError(f"{name} is not a dynamic dsnet model")
    input_size = check_input_size(model, args.input_size) if args.input_size else None
    if args.latency_table:
        return _run_latency_table(model, name, input_size, args)
    mix, source = args.mix, "given (--mix)" if args.mix is not None else "synthetic default"
    if args.checkpoint and mix is None:
        mix, source = checkpoint_mix(model, ckpt, args.routing_images, args.data)
        print(f"routing mix: {'/'.join(f'{w:.3f}' for w in mix)} ({source})", file=sys.stderr, flush=True)
    config = BenchConfig(
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        device=args.device,
        subnets=args.subnets,
        mix=mix,
        repeats=args.repeats,
        warmup=args.warmup,
        input_size=input_size,
        channels_last=False if args.no_channels_last else None,
        masked=not args.no_masked,
        onnx=args.onnx,
    )
    report = run_benchmark(model, config, model_name=name, log=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "dsnet " + " ".join(sys.argv[1:])
    report["mix_source"] = source
    print(format_report(report))
    if args.json:
        atomic_write_json(report, args.json)
    return 0


def _run_latency_table(model, name: str, input_size: tuple[int, ...] | None, args: argparse.Namespace) -> int:  # noqa: ANN001
    """``--latency-table FILE``: each routing choice timed here (eager, and ONNX Runtime with ``--onnx``)."""
    from dsnet.bench.latency import format_latency_table, measure_latency_table

    if args.subnets is not None or args.mix is not None or args.no_masked:
        raise ValueError("--latency-table times every routing choice: --subnets, --mix and --no-masked do not apply")
    table = measure_latency_table(
        model,
        batch_sizes=args.batch_sizes,
        runtimes=("eager", "onnx") if args.onnx else ("eager",),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        input_size=input_size,
        channels_last=False if args.no_channels_last else None,
        model_name=name,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    table.data["command"] = "dsnet " + " ".join(sys.argv[1:])
    print(format_latency_table(table))
    table.save(args.latency_table)
    print(f"wrote {args.latency_table}")
    if args.json:
        atomic_write_json(table.data, args.json)
    return 0


def checkpoint_mix(model, ckpt: dict, images: int, root: str | None = None) -> tuple[list[float], str]:  # noqa: ANN001
    """The checkpoint's own routing mix: its gate on the first ``images`` images of its selection split.

    The split is the one training selected on, as the checkpoint's data config says: the held-out slice of
    the training set, or the validation/test split when ``data.holdout`` is 0. Its images are prepared with
    the recorded data recipe. Data that cannot be read here is a one-line error that suggests ``--mix``.
    """
    import copy

    from dsnet.bench.routing import measured_mix
    from dsnet.data import build_loader
    from dsnet.data.recipe import with_recorded_recipe

    data = copy.deepcopy((ckpt.get("config") or {}).get("data") or {})
    if not data:
        raise ValueError("the checkpoint records no data config to measure its routing on: pass --mix")
    if root is not None:
        data["root"] = root
    data = with_recorded_recipe(data, ckpt.get("dataset"))
    split = "val" if data.get("holdout") == 0 else "holdout"
    try:
        loader, info = build_loader(data, split, seed=0)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot read the checkpoint's {split} images to measure its routing ({' '.join(str(err).split())}); "
            "pass --data DIR, or --mix for a synthetic mix"
        ) from None
    mix, seen = measured_mix(model, loader, images)
    what = "held-out training images" if split == "holdout" else f"{split} images"
    return mix, f"the checkpoint's gate on the first {seen} {what} of {info.name}"


def _run_lcnet(model, name: str, args: argparse.Namespace) -> int:  # noqa: ANN001
    """LC-Net: sparse channel gather vs prefix slice vs zero-masking at equal MACs, and block skipping."""
    from dsnet.bench.lcnet import LCBenchConfig, format_lcnet_report, run_lcnet_benchmark

    if args.subnets is not None or args.mix is not None or args.onnx or args.no_masked:
        raise ValueError("--subnets, --mix, --onnx and --no-masked apply to DS-Net models, not LC-Nets")
    config = LCBenchConfig(
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        input_size=(model.in_chans, args.input_size, args.input_size) if args.input_size else None,
    )
    if args.densities is not None:
        config.densities = args.densities
    if args.skip_fractions is not None:
        config.skip_fractions = args.skip_fractions
    report = run_lcnet_benchmark(model, config, model_name=name, log=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "dsnet " + " ".join(sys.argv[1:])
    print(format_lcnet_report(report))
    if args.json:
        atomic_write_json(report, args.json)
    return 0
