"""``dsnet models``: the registered models, their size and MAC range; ``--options NAME``: constructor options.

Counting every sub-network's MACs runs each one once (and the first use of
torch's FLOP counter imports ``torch._dynamo``): tens of seconds for all
models. The summaries are cached per model in ``$DSNET_CACHE`` (default
``~/.cache/dsnet``), keyed by a digest of the code that defines models and
counts MACs (``dsnet/models``, ``dsnet/layers``, ``dsnet/macs.py``) and the
torch version, so an edit to a model invalidates its entry; the first run
fills it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from dsnet.cli._args import output_file
from dsnet.models import create_model, list_models, model_info
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models with parameters and MACs")
    p.add_argument("--subnets", metavar="MODEL", help="list every sub-network of one model instead")
    p.add_argument(
        "--options",
        metavar="MODEL",
        help="list the constructor options of one model (model.kwargs in a config), with their defaults",
    )
    p.add_argument("--no-cache", action="store_true", help="recount everything (the cache is rewritten)")
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


_CODE = ("models", "layers", "macs.py")  # what a summary depends on (besides torch)


def _code_digest() -> str:
    """A digest of the code that builds models and counts MACs, and of the torch version."""
    import torch

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(torch.__version__.encode())
    for part in _CODE:
        for path in sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part]:
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def cache_path() -> Path:
    env = os.environ.get("DSNET_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "dsnet") / "models.json"


def cached_summaries(names: list[str], summarise, use_cache: bool = True) -> list[dict[str, Any]]:  # noqa: ANN001
    """``summarise(name)`` for each name, from the cache where the code is unchanged; new entries are saved."""
    path, digest = cache_path(), _code_digest()
    cache: dict[str, Any] = {}
    if use_cache:
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    entries = cache.get(digest, {}) if isinstance(cache, dict) else {}
    out, fresh = [], False
    for name in names:
        if name not in entries:
            entries[name], fresh = summarise(name), True
        out.append(entries[name])
    if fresh:
        try:
            atomic_write_json({digest: entries}, path)  # entries of older code are dropped
        except OSError:
            pass  # a read-only home: no cache, still correct
    return out


def _value(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "(required)"
    return repr(list(value) if isinstance(value, tuple) else value)


def model_options(name: str) -> tuple[str, list[dict[str, Any]]]:
    """A model's family class name and constructor options: each argument, its default, the value ``name`` uses.

    ``name``'s factory may set some arguments (``ds_resnet8_tiny``: ``stem_stride=2``): ``value`` is what the
    model is built with, ``class_default`` the family's own default. Any of them can go in ``model.kwargs``
    (except those a factory fixes, which ``create_model`` reports as an error).
    """
    if ":" in name:  # a user's "package.module:factory"
        module, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        factory = model_info(name).factory
    model = create_model(name)
    cls = type(model)
    signature = inspect.signature(cls.__init__)
    seen: dict[str, Any] = {}
    original = cls.__init__

    def recording(self, *a, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
        if not seen:
            bound = signature.bind(self, *a, **kw)
            bound.apply_defaults()
            seen.update(bound.arguments)
        original(self, *a, **kw)

    cls.__init__ = recording
    try:
        factory()
    finally:
        cls.__init__ = original
    rows = []
    for pname, param in signature.parameters.items():
        if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        rows.append(
            {
                "option": pname,
                "value": _value(seen.get(pname, param.default)),
                "class_default": _value(param.default),
            }
        )
    return cls.__name__, rows


def run(args: argparse.Namespace) -> int:
    if args.options:
        family, rows = model_options(args.options)
        table = [
            [r["option"], r["value"], "" if r["value"] == r["class_default"] else r["class_default"]] for r in rows
        ]
        print(
            format_table(
                ["option", f"{args.options}", f"{family} default (if different)"],
                table,
                title=f"{args.options} constructor options (model.kwargs; num_classes/in_chans come from the data)",
            )
        )
        if args.json:
            atomic_write_json(rows, args.json)
        return 0
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
                " ".join(f"{n}={w}" for n, w in s.as_dict().items())
                if s.kernels is None
                else " ".join(f"{n}={w}/{k}x{k}" for n, w, k in zip(s.stage_names, s.widths, s.kernels)),
                round(m / 1e6, 1),
                "gate" if s.index in model.routing_space else ("" if s.routed else "training only"),
            ]
            for s, m in zip(model.subnets, macs)
        ]
        size = "x".join(map(str, model.default_input_size))
        print(format_table(["#", "widths", "MMACs", "role"], rows, title=f"{args.subnets} sub-networks at {size}"))
        records = [
            {
                "index": s.index,
                "widths": s.as_dict(),
                **({} if s.kernels is None else {"kernels": s.kernel_dict()}),
                "macs": m,
                "routed": s.routed,
            }
            for s, m in zip(model.subnets, macs)
        ]
    else:
        records = cached_summaries(list_models(kind="supernet"), model_summary, not args.no_cache)
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
        lc_records = cached_summaries(list_models(kind="lcnet"), lcnet_summary, not args.no_cache)
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
