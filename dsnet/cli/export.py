"""``dsnet export``: a static sub-network or the whole dynamic model as ONNX, checked against eager."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dsnet.cli._args import check_input_size, output_file, positive_int

FORMATS = ("onnx",)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    if args.subnet is not None and not 0 <= args.subnet < len(model.subnets):
        raise ValueError(
            f"subnet index {args.subnet} out of range: {name} has {len(model.subnets)} sub-networks "
            f"(0..{len(model.subnets) - 1})"
        )
    size = check_input_size(model, args.input_size)
    tol = 1e-4
    n = max(args.check_batch, len(model.routing_space))
    images = torch.randn(n, *size, generator=torch.Generator().manual_seed(0))
    if args.subnet is not None:
        path = export_static(model, args.subnet, args.out, size, dataset=dataset)
        params = sum(p.numel() * p.element_size() for p in model.extract(args.subnet).parameters())
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB; sub-network parameters {params / 1e6:.2f} MB)")
        if not args.no_check:
            diff = check_static(model, args.subnet, path, images)
            _report(f"onnxruntime vs eager, sub-network {args.subnet}: max abs diff {diff:.2e}", diff, tol)
        return 0
    manifest = export_dynamic(model, args.out, size, model_name=name, dataset=dataset)
    files = sorted(Path(manifest).parent.glob(Path(args.out).with_suffix("").name + ".*"))
    total = sum(f.stat().st_size for f in files)
    print(f"wrote dynamic bundle {manifest} ({len(files)} files, {total / 1e6:.2f} MB)")
    if dataset:
        print(f"manifest: preprocessing and {len(dataset.get('class_names') or [])} class names of {dataset['name']}")
    else:
        print("manifest: no mean/std or class names (random weights; export a checkpoint to record them)")
    if not args.no_check:
        res = check_dynamic(model, manifest, images)
        diff = max(res["forced_max_abs_diff"], res["gate_max_abs_diff"])
        _report(
            f"onnxruntime vs eager, dynamic, routed to choices {res['choices_checked']}: "
            f"max abs diff {res['forced_max_abs_diff']:.2e}; own gate: {res['gate_max_abs_diff']:.2e}, "
            f"decisions agree: {res['gate_choices_agree']}",
            diff,
            tol,
        )
    return 0


def _report(message: str, diff: float, tol: float) -> None:
    ok = diff <= tol
    print(f"check {'OK' if ok else 'FAILED'}: {message} (tolerance {tol:g})")
    if not ok:
        raise ValueError(f"exported graph differs from eager by {diff:.2e} > {tol:g}")
