"""``dsnet models``: the registered models, their size and MAC range; ``--options NAME``: constructor options.

Counting every sub-network's MACs runs each one once (and the first use of
torch's FLOP counter imports ``torch._dynamo``): tens of seconds for all
models. The summaries are cached per model in ``$DSNET_CACHE`` (default
``~/.cache/dsnet``), keyed by a digest of the code that defines models and
counts MACs (``dsnet/models``, ``dsnet/layers``, ``dsnet/macs.py``, ``dsnet/utils/flops.py``) and the
torch version, so an edit to a model invalidates its entry; the first run
fills it. With every summary cached, ``dsnet models`` reads the cache alone:
it imports neither torch nor the model families.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
from pathlib import Path
from typing import Any

from dsnet.cli._args import Subcommands, apply_common_arguments, output_file
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("models", help="list registered models with parameters and MACs")
    p.add_argument("--subnets", metavar="MODEL", help="list every sub-network of one model instead")
    p.add_argument(
        "--options",
        metavar="MODEL",
        help="list the constructor options of one model (model.kwargs in a config), with their defaults",
    )
    p.add_argument("--no-cache", action="store_true", help="recount everything (the cache is rewritten)")
    p.add_argument("--json", metavar="FILE", type=output_file, help="also write the table as JSON")
    p.set_defaults(func=run, defer_common_arguments=True)  # run() sets the thread count if torch is needed


def model_summary(name: str) -> dict:
    from dsnet.models import create_model, model_info

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
    from dsnet.models import create_model, model_info

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


_CODE = ("models", "layers", "macs.py", "utils/flops.py")  # what a summary depends on (besides torch)


def _torch_version() -> str:
    """torch's version, from its package metadata: importing torch takes seconds, a warm listing needs none."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # not installed as a distribution: ask torch itself
        import torch

        return torch.__version__


def _code_digest() -> str:
    """A digest of the code that builds models and counts MACs, and of the torch version."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(_torch_version().encode())
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


_NAMES = "__models__"  # in a cache entry: the registered names of each kind (the listing without torch)
_KINDS = ("supernet", "lcnet")


def _read_entries() -> dict[str, Any]:
    """This code version's cache entries ({} when there are none or the cache is unreadable)."""
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    entries = cache.get(_code_digest()) if isinstance(cache, dict) else None
    return entries if isinstance(entries, dict) else {}


def cached_listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """Both tables of ``dsnet models`` from the cache alone (nothing imported, nothing built), or None.

    None unless the cache holds, for this code version, the registered names and every one's summary. The
    names are a function of the code the digest covers (the registrations are in ``dsnet/models``).
    """
    entries = _read_entries()
    names = entries.get(_NAMES)
    if not isinstance(names, dict) or not all(isinstance(names.get(k), list) for k in _KINDS):
        return None
    if not all(n in entries for k in _KINDS for n in names[k]):
        return None
    supernets, lcnets = ([entries[n] for n in names[k]] for k in _KINDS)
    return supernets, lcnets


def _remember_names(names: dict[str, list[str]]) -> None:
    """Record the registered names next to this code version's summaries (best effort, as the summaries)."""
    entries = _read_entries()
    if entries.get(_NAMES) == names:
        return
    try:
        atomic_write_json({_code_digest(): {**entries, _NAMES: names}}, cache_path())
    except OSError:
        pass


def _print_supernets(records: list[dict[str, Any]]) -> None:
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


def _print_lcnets(lc_records: list[dict[str, Any]]) -> None:
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
    from dsnet.models import create_model, model_info

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
    if not args.options and not args.subnets and not args.no_cache:
        cached = cached_listing()  # the usual case: every summary known, so not even torch is imported
        if cached is not None:
            records, lc_records = cached
            _print_supernets(records)
            _print_lcnets(lc_records)
            if args.json:
                atomic_write_json(records + lc_records, args.json)
            return 0
    apply_common_arguments(args)  # the thread count, now that torch runs (dsnet.cli.main leaves it to us)
    from dsnet.models import create_model, list_models, model_info

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
        _print_supernets(records)
        lc_records = cached_summaries(list_models(kind="lcnet"), lcnet_summary, not args.no_cache)
        _print_lcnets(lc_records)
        _remember_names({kind: list_models(kind=kind) for kind in _KINDS})
        records += lc_records
    if args.json:
        atomic_write_json(records, args.json)
    return 0
