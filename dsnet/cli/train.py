"""``dsnet train supernet|gate|lcnet``: the two DS-Net training stages, and LC-Net training."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dsnet.cli._args import Subcommands, output_dir


def add_parser(sub: Subcommands) -> None:
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
        s.add_argument(
            "--out", required=True, type=output_dir, help="run directory (checkpoints, metrics, resolved config)"
        )
        s.add_argument("--resume", action="store_true", help="continue the run in --out from its last.ckpt")
        s.add_argument("--data", help="dataset root (overrides data.root)")
        if name == "gate":
            s.add_argument("--supernet", required=True, help="stage I checkpoint (e.g. runs/x/best.ckpt)")
        s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsnet.models.registry import check_factory_trusted, trust_factories
    from dsnet.train.config import load_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.resume and not args.config:
        # a resumed run continues with the configuration it was started with (its checkpoint's, if config.yaml
        # is gone); RunDir checks that --set changes nothing but paths and logging
        from dsnet.train.config import apply_overrides, resolve_config

        cfg = resolve_config(apply_overrides(_run_config(Path(args.out)), overrides))
        # the model name came from the run folder, not from the user: a factory there must be allowed
        check_factory_trusted(cfg["model"]["name"], f"{args.out}'s recorded config (model.name)")
    else:
        cfg = load_config(args.config, overrides)
        if ":" in cfg["model"]["name"]:
            trust_factories([cfg["model"]["name"]])  # the user named it, in their recipe or with --set
    if args.stage == "supernet":
        from dsnet.train.supernet import train_supernet

        result = train_supernet(cfg, args.out, resume=args.resume)
    elif args.stage == "lcnet":
        from dsnet.train.lcnet import train_lcnet

        result = train_lcnet(cfg, args.out, resume=args.resume)
    else:
        from dsnet.train.gate import train_gate

        result = train_gate(cfg, args.supernet, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # one summary per launch: the other DDP ranks have none to give
        print(json.dumps(result, indent=2))
    return 0


def _run_config(out: Path) -> dict:
    import yaml

    from dsnet.train.checkpoint import read_checkpoint

    resolved = out / "config.yaml"
    if resolved.is_file():
        try:
            cfg = yaml.safe_load(resolved.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{resolved}: not valid YAML ({' '.join(str(err).split())})") from None
        if isinstance(cfg, dict):
            return cfg
    if not (out / "last.ckpt").is_file():
        raise FileNotFoundError(f"--resume: no {out / 'last.ckpt'} to resume from")
    cfg = read_checkpoint(out / "last.ckpt").get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"--resume: neither {resolved} nor {out / 'last.ckpt'} records the run's config")
    return cfg
