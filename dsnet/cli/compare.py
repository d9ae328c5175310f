"""``dsnet compare``: DS-Net, US-Nets, networks trained alone, progressive search and a cascade, side by side."""

from __future__ import annotations

import argparse

from dsnet.cli._args import Subcommands


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "compare",
        help="train every method on the same data and epochs, evaluate and time them with one harness",
        description=(
            "Train or derive each method (DS-Net gate, its static sub-networks, a confidence cascade, US-Nets, "
            "networks trained alone, progressive sub-network search, a gate over the searched widths) on the same "
            "data with the same epochs; evaluate all on the test split and time all interleaved with the same "
            "threads. Writes compare.json, compare.md and compare.png. A re-run continues where it stopped."
        ),
    )
    p.add_argument("--fast", action="store_true", help="the quickstart's --fast data and epochs (minutes)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="a Fashion-MNIST folder (default: /usr/share/datasets/fashion-mnist, else downloaded) or an image "
        "folder: DIR/train/<class>/*.png|jpg and DIR/val/<class>/... (or DIR/test/), found by its layout; "
        "10%% of the training images (at most 5,000; 2,500 with --fast) are held out for selection",
    )
    p.add_argument("--out", default="runs/compare", help="run directory; a re-run continues where it stopped")
    p.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        help="comma-separated methods (default: all): dsnet,static,cascade,usnet,alone,lcnet,pss,pss_gate,pss_uniform,"
        "pss_uniform_gate",
    )
    p.add_argument("--seeds", type=int, default=1, help="train every method with N seeds (mean and spread)")
    p.add_argument("--model", help="model family (default: the quickstart's ds_resnet8_tiny)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (supernet.epochs=4) or a comparison setting (pss.threshold=2, timing.repeats=5)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.compare import run_compare

    run_compare(
        args.out,
        fast=args.fast,
        data=args.data,
        methods=args.methods,
        seeds=args.seeds,
        model=args.model,
        overrides=args.overrides,
        progress=not args.no_progress,
    )
    return 0
