"""``dsnet train supernet|gate|lcnet``: the two DS-Net training stages, and LC-Net training."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a supernet (stage I), its gate (stage II), or an LC-Net")
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True
    for name, help_text in (
        ("supernet", "stage I: sandwich rule + in-place bootstrapping, then BN recalibration"),
        ("gate", "stage II: train the gate's slimming head on a frozen supernet (SGS + task + MACs losses)"),
        ("lcnet", "LC-Net: per-input block skipping (L-Nets) and channel skipping (C-Nets), trained together"),
    ):
        s = stages.add_parser(name, help=help_text)
        s.add_argument("--config", help="YAML recipe (see configs/); defaults apply to keys it omits")
        s.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set supernet.epochs=3 (repeatable)",
        )
        s.add_argument("--out", required=True, help="run directory (checkpoints, metrics, resolved config)")
        s.add_argument("--resume", action="store_true", help="continue the run in --out from its last.ckpt")
        s.add_argument("--data", help="dataset root (overrides data.root)")
        if name == "gate":
            s.add_argument("--supernet", required=True, help="stage I checkpoint (e.g. runs/x/best.ckpt)")
        s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.train.config import load_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.resume and not args.config:
        # a resumed run continues with the configuration it was started with
        from pathlib import Path

        import yaml

        resolved = Path(args.out) / "config.yaml"
        if not resolved.is_file():
            raise FileNotFoundError(f"--resume: no {resolved}")
        from dsnet.train.config import apply_overrides, resolve_config

        cfg = resolve_config(apply_overrides(yaml.safe_load(resolved.read_text()), overrides))
    else:
        cfg = load_config(args.config, overrides)
    if args.stage == "supernet":
        from dsnet.train.supernet import train_supernet

        result = train_supernet(cfg, args.out, resume=args.resume)
    elif args.stage == "lcnet":
        from dsnet.train.lcnet import train_lcnet

        result = train_lcnet(cfg, args.out, resume=args.resume)
    else:
        from dsnet.train.gate import train_gate

        result = train_gate(cfg, args.supernet, args.out, resume=args.resume)
    print(json.dumps(result, indent=2))
    return 0
