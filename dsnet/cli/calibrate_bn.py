"""``dsnet calibrate-bn``: recompute every sub-network's BN statistics of a checkpoint."""

from __future__ import annotations

import argparse

from dsnet.cli._args import device_or_auto, output_file, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-bn", help="reset and re-estimate the BN statistics of every sub-network")
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--out", type=output_file, help="where to write the calibrated checkpoint (default: overwrite --checkpoint)"
    )
    p.add_argument("--data", help="dataset root (overrides the checkpoint's data.root)")
    p.add_argument("--batches", type=positive_int, help="training batches per sub-network (default: from the config)")
    p.add_argument("--device", type=device_or_auto, default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.train.distributed import resolve_device
    from dsnet.train.supernet import calibrate_checkpoint

    overrides = {"root": args.data} if args.data else None
    info = calibrate_checkpoint(
        args.checkpoint,
        args.out or args.checkpoint,
        device=resolve_device(args.device),
        num_batches=args.batches,
        data_overrides=overrides,
    )
    print(
        f"recalibrated {info['subnets']} sub-networks x {info['batches_per_subnet']} batches "
        f"in {info['seconds']:.1f}s -> {args.out or args.checkpoint}"
    )
    return 0
