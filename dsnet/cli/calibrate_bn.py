"""``dsnet calibrate-bn``: recompute every sub-network's BN statistics of a checkpoint."""

from __future__ import annotations

import argparse

from dsnet.cli._args import Subcommands, device_or_auto, output_file, positive_int


def add_parser(sub: Subcommands) -> None:
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
    _check_checkpoint(args.checkpoint, overrides)
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


def _check_checkpoint(path: str, data_overrides: dict | None) -> None:
    """Refuse, before any work, an LC-Net checkpoint or data whose classes differ from the checkpoint's."""
    from dsnet.data import check_class_names, dataset_class_names
    from dsnet.models.base import DynamicNet
    from dsnet.train.checkpoint import build_checkpoint_model, read_checkpoint

    ckpt = read_checkpoint(path)
    if not isinstance(build_checkpoint_model(ckpt, path), DynamicNet):
        raise ValueError(
            f"{path} is an LC-Net checkpoint ({ckpt['model']['name']}); calibrate-bn applies to DS-Net supernets "
            "(LC-Net keeps its BN statistics from training)"
        )
    data = (ckpt.get("config") or {}).get("data")
    if isinstance(data, dict):
        cfg = {**data, **(data_overrides or {})}
        check_class_names(
            ckpt.get("dataset"), dataset_class_names(cfg), path, f"{cfg.get('dataset')} ({cfg.get('root')})"
        )
