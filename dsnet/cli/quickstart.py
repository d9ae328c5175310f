"""``dsnet quickstart``: train, calibrate, gate, evaluate and time a DS-Net on Fashion-MNIST."""

from __future__ import annotations

import argparse

from dsnet.cli._args import Subcommands, output_dir


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole method on Fashion-MNIST in minutes (stage I, BN recalibration, stage II, eval, timing)",
    )
    p.add_argument(
        "--fast", action="store_true", help="25,600 training images, 3 + 1 epochs: under 3 minutes (lower accuracy)"
    )
    p.add_argument("--data", help="Fashion-MNIST folder (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument(
        "--out", type=output_dir, default="runs/quickstart", help="run directory; a re-run continues where it stopped"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set supernet.epochs=6",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run seeds 0..N-1 (OUT/seed<i>) and report mean and spread of every headline figure",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.quickstart import run_quickstart, run_seeds

    if args.seeds != 1:
        run_seeds(args.out, args.seeds, fast=args.fast, data=args.data, overrides=args.overrides)
    else:
        run_quickstart(args.out, fast=args.fast, data=args.data, overrides=args.overrides)
    return 0
