"""``dsnet search``: progressive sub-network search from a trained network (SPEC 6.2)."""

from __future__ import annotations

import argparse

from dsnet.cli._args import Subcommands


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "search",
        help="progressive sub-network search: nested non-uniform widths from a trained network",
        description=(
            "Rank channel groups by learned noise, remove the least important ones step by step down to each MAC "
            "target (fine-tuning when held-out accuracy falls past a threshold), keep the Pareto-efficient "
            "candidates, and save a supernet of the searched sub-networks. `dsnet train gate --supernet OUT/best.ckpt` "
            "then trains a DS-Net gate over them."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="a trained network (alone, or a supernet: see --subnet)")
    p.add_argument("--subnet", type=int, help="start from this sub-network of a supernet (default: widest routed)")
    p.add_argument("--out", required=True, help="output folder (best.ckpt, summary.json)")
    p.add_argument("--config", help="YAML recipe for data and BN calibration (default: the checkpoint's own)")
    p.add_argument("--data", help="dataset root (overrides data.root)")
    p.add_argument(
        "--targets-mmacs",
        type=_numbers,
        help="MAC targets in MMACs, e.g. 1.4,2.6,4.4,6.9 (default: pss.num_subnets evenly spaced)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe key (data.holdout=5000) or a search setting (pss.threshold=1.0, pss.group_size=8)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier search in --out (default: refuse an occupied one)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.search.pss import PSS_SCHEMA, run_pss
    from dsnet.train.checkpoint import read_checkpoint
    from dsnet.train.config import apply_overrides, load_config, resolve_config
    from dsnet.utils.schema import resolve_section

    ours = [o for o in args.overrides if o.startswith("pss.")]
    training = [o for o in args.overrides if o not in ours] + ([f"data.root={args.data}"] if args.data else [])
    if args.config:
        cfg = load_config(args.config, training)
    else:
        cfg = resolve_config(apply_overrides(read_checkpoint(args.checkpoint).get("config") or {}, training))
    settings = resolve_section({"pss": PSS_SCHEMA}, apply_overrides({}, ours), "")["pss"]
    if args.targets_mmacs is not None and not args.targets_mmacs:
        raise ValueError("--targets-mmacs: no targets given")
    targets = None if args.targets_mmacs is None else [t * 1e6 for t in args.targets_mmacs]
    summary = run_pss(
        args.checkpoint,
        cfg,
        settings,
        args.out,
        targets_macs=targets,
        subnet=args.subnet,
        progress=not args.no_progress,
        replace=args.overwrite,
    )
    from dsnet.utils.table import format_table

    rows = [
        [
            i,
            " ".join(map(str, summary["chain"][j]["widths"])),
            round(summary["chain"][j]["macs"] / 1e6, 2),
            summary["chain"][j]["top1_final"],
        ]
        for i, j in enumerate(summary["selected"])
    ]
    print(format_table(["#", "widths", "MMACs", "held-out top-1 %"], rows, title="Searched sub-networks"))
    print(f"{len(summary['chain'])} candidates, {summary['finetunes']} fine-tunings, {summary['seconds']:.0f} s")
    print(f"supernet: {args.out}/best.ckpt (dsnet train gate --supernet {args.out}/best.ckpt ...)")
    return 0
