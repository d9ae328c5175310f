"""``dsnet models``: the registered models, their size and MAC range."""

from __future__ import annotations

import argparse

from dsnet.cli._args import output_file
from dsnet.models import create_model, list_models, model_info
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models with parameters and MACs")
    p.add_argument("--subnets", metavar="MODEL", help="list every sub-network of one model instead")
    p.add_argument("--json", metavar="FILE", type=output_file, help="also write the table as JSON")
    p.set_defaults(func=run)


def model_summary(name: str) -> dict:
    model = create_model(name)
    macs = model.subnet_macs()
    routed = [m for s, m in zip(model.subnets, macs) if s.routed]
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "subnets": len(model.subnets),
        "routing_space": model.routing_space,
        "slimmest_mmacs": routed[0] / 1e6,
        "widest_routed_mmacs": routed[-1] / 1e6,
        "largest_mmacs": macs[-1] / 1e6,
        "input_size": list(model.default_input_size),
        "description": model_info(name).description,
    }


def lcnet_summary(name: str) -> dict:
    """An LC-Net's size and MAC range: every skippable block skipped / none skipped, and the dense ResNet."""
    model = create_model(name)
    table = model.macs_table()
    return {
        "model": name,
        "kind": "lcnet",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "blocks": len(model.blocks),
        "skippable_blocks": sum(model.skippable),
        "density": model.density,
        "all_skipped_mmacs": table.fixed / 1e6,
        "none_skipped_mmacs": table.all_executed / 1e6,
        "dense_mmacs": table.dense / 1e6,
        "input_size": list(model.default_input_size),
        "description": model_info(name).description,
    }


def run(args: argparse.Namespace) -> int:
    if args.subnets and model_info(args.subnets).kind == "lcnet":
        raise ValueError(
            f"{args.subnets} is an LC-Net: it has no sub-networks (it skips blocks and channels per input)"
        )
    if args.subnets:
        model = create_model(args.subnets)
        macs = model.subnet_macs()
        rows = [
            [
                s.index,
                " ".join(f"{n}={w}" for n, w in s.as_dict().items()),
                round(m / 1e6, 1),
                "gate" if s.index in model.routing_space else ("" if s.routed else "training only"),
            ]
            for s, m in zip(model.subnets, macs)
        ]
        size = "x".join(map(str, model.default_input_size))
        print(format_table(["#", "widths", "MMACs", "role"], rows, title=f"{args.subnets} sub-networks at {size}"))
        records = [
            {"index": s.index, "widths": s.as_dict(), "macs": m, "routed": s.routed}
            for s, m in zip(model.subnets, macs)
        ]
    else:
        records = [model_summary(n) for n in list_models(kind="supernet")]
        rows = [
            [
                r["model"],
                round(r["params_m"], 2),
                r["subnets"],
                round(r["slimmest_mmacs"], 1),
                round(r["widest_routed_mmacs"], 1),
                round(r["largest_mmacs"], 1),
                "x".join(map(str, r["input_size"])),
            ]
            for r in records
        ]
        headers = ["model", "params (M)", "subnets", "slimmest MMACs", "widest routed MMACs", "largest MMACs", "input"]
        print(format_table(headers, rows))
        lc_records = [lcnet_summary(n) for n in list_models(kind="lcnet")]
        lc_rows = [
            [r["model"], round(r["params_m"], 2), f"{r['skippable_blocks']}/{r['blocks']}", r["density"],
             round(r["all_skipped_mmacs"], 1), round(r["none_skipped_mmacs"], 1), round(r["dense_mmacs"], 1),
             "x".join(map(str, r["input_size"]))]
            for r in lc_records
        ]  # fmt: skip
        lc_headers = ["model", "params (M)", "skippable", "density", "all skipped MMACs", "none skipped MMACs",
                      "dense MMACs", "input"]  # fmt: skip
        print()
        print(format_table(lc_headers, lc_rows, title="LC-Net models (per-input block and channel skipping)"))
        records += lc_records
    if args.json:
        atomic_write_json(records, args.json)
    return 0
