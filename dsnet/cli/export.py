"""``dsnet export``: a static sub-network or the whole dynamic model as ONNX, checked against eager."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from dsnet.cli._args import Subcommands, check_input_size, output_file, positive_int

FORMATS = ("onnx",)


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("export", help="export a sub-network or the dynamic model (ONNX), verified with onnxruntime")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="dsnet checkpoint to load (EMA weights if present)")
    src.add_argument("--model", help="registered model name (random weights, for trying the export)")
    p.add_argument("--subnet", type=int, default=None, help="static sub-network to export; omit: dynamic model")
    p.add_argument("--format", default="onnx", help="export format (only 'onnx')")
    p.add_argument(
        "--out", required=True, type=output_file, help="output .onnx (dynamic: the pre-gate graph; siblings beside it)"
    )
    p.add_argument(
        "--input-size", type=positive_int, default=None, help="image side of the example input (default: model's)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with eager")
    p.add_argument("--check-batch", type=positive_int, default=8, help="images in the eager comparison (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsnet.export import check_dynamic, check_static, export_dynamic, export_static
    from dsnet.models import create_model
    from dsnet.models.base import DynamicNet

    if args.format not in FORMATS:
        raise ValueError(f"unknown export format {args.format!r}; supported: {', '.join(FORMATS)}")
    if args.checkpoint:
        from dsnet.train.checkpoint import load_model

        model, ckpt = load_model(args.checkpoint)
        name, dataset = ckpt["model"]["name"], ckpt.get("dataset")
    else:
        model, name, dataset = create_model(args.model).eval(), args.model, None
    if not isinstance(model, DynamicNet):
        raise ValueError(f"{name} is not a dynamic dsnet model")
    names = (dataset or {}).get("class_names") if isinstance(dataset, dict) else None
    if names and len(names) != model.num_classes:
        raise ValueError(
            f"{args.checkpoint}: its dataset record names {len(names)} classes ({', '.join(map(str, names[:5]))}"
            f"{', ...' if len(names) > 5 else ''}) but the model has {model.num_classes} outputs; the bundle's "
            "class names would mislabel its answers"
        )
    if args.subnet is not None and not 0 <= args.subnet < len(model.subnets):
        raise ValueError(
            f"subnet index {args.subnet} out of range: {name} has {len(model.subnets)} sub-networks "
            f"(0..{len(model.subnets) - 1})"
        )
    size = check_input_size(model, args.input_size)
    tol = 1e-4
    n = max(args.check_batch, len(model.routing_space))
    images = torch.randn(n, *size, generator=torch.Generator().manual_seed(0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written into a staging folder beside --out and moved into place only once checked: a failed export or
    # check leaves no file behind and an earlier export at --out as it was
    stage = Path(tempfile.mkdtemp(prefix=".dsnet-export-", dir=out.parent))
    try:
        if args.subnet is not None:
            staged = export_static(model, args.subnet, stage / out.name, size, dataset=dataset)
            params = sum(p.numel() * p.element_size() for p in model.extract(args.subnet).parameters())
            mb = os.path.getsize(staged) / 1e6
            if not args.no_check:
                diff = check_static(model, args.subnet, staged, images)
                _report(f"onnxruntime vs eager, sub-network {args.subnet}: max abs diff {diff:.2e}", diff, tol)
            os.replace(staged, out)
            print(f"wrote {out} ({mb:.2f} MB; sub-network parameters {params / 1e6:.2f} MB)")
            return 0
        staged = export_dynamic(model, stage / out.name, size, model_name=name, dataset=dataset)
        if not args.no_check:
            res = check_dynamic(model, staged, images)
            diff = max(res["forced_max_abs_diff"], res["gate_max_abs_diff"])
            _report(
                f"onnxruntime vs eager, dynamic, routed to choices {res['choices_checked']}: "
                f"max abs diff {res['forced_max_abs_diff']:.2e}; own gate: {res['gate_max_abs_diff']:.2e}, "
                f"decisions agree: {res['gate_choices_agree']}",
                diff,
                tol,
            )
        manifest, files, stale = _install_bundle(staged, out.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    total = sum(f.stat().st_size for f in files)
    gone = f"; removed {len(stale)} stale file(s) of the earlier bundle" if stale else ""
    print(f"wrote dynamic bundle {manifest} ({len(files)} files, {total / 1e6:.2f} MB{gone})")
    if dataset:
        print(f"manifest: preprocessing and {len(dataset.get('class_names') or [])} class names of {dataset['name']}")
    else:
        print("manifest: no mean/std or class names (random weights; export a checkpoint to record them)")
    return 0


def _bundle_files(manifest: dict) -> list[str]:
    """The graph files a bundle manifest names (pre-gate first)."""
    names = [manifest.get("pre", {}).get("file")] + [p.get("file") for p in manifest.get("post", [])]
    return [n for n in names if isinstance(n, str) and n and Path(n).name == n]


def _install_bundle(staged_manifest: Path, folder: Path) -> tuple[Path, list[Path], list[Path]]:
    """Move a checked bundle into ``folder``, manifest last, and delete what an earlier bundle of that name left.

    The earlier bundle's files are those its manifest lists and ``<stem>.post<j>.onnx`` siblings: a smaller
    bundle exported over a larger one must not leave graphs that are no longer part of it.
    Returns (manifest, the bundle's files, the stale files removed).
    """
    new = json.loads(staged_manifest.read_text())
    keep = _bundle_files(new)
    target = folder / staged_manifest.name
    old_files: set[str] = set()
    if target.is_file():
        try:
            old_files = set(_bundle_files(json.loads(target.read_text())))
        except (ValueError, OSError, AttributeError):
            old_files = set()
    stem = staged_manifest.name.removesuffix(".manifest.json")
    pattern = re.compile(re.escape(stem) + r"\.post\d+\.onnx")
    old_files |= {p.name for p in folder.glob(f"{glob.escape(stem)}.post*.onnx") if pattern.fullmatch(p.name)}
    for name in keep:
        os.replace(staged_manifest.parent / name, folder / name)
    os.replace(staged_manifest, target)
    stale = [folder / n for n in sorted(old_files - set(keep))]
    for path in stale:
        path.unlink(missing_ok=True)
    return target, [folder / n for n in keep] + [target], stale


def _report(message: str, diff: float, tol: float) -> None:
    ok = diff <= tol
    print(f"check {'OK' if ok else 'FAILED'}: {message} (tolerance {tol:g})")
    if not ok:
        raise ValueError(f"exported graph differs from eager by {diff:.2e} > {tol:g}")
