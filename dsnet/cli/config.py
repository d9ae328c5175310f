"""``dsnet config reference|show|check``: the config keys, a recipe resolved with its defaults, or validated."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="config reference; show or check a recipe")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    ref = actions.add_parser("reference", help="every config key as Markdown (type, default, range, stage)")
    ref.set_defaults(func=run)
    for name, help_text in (
        ("show", "print the resolved config (every default filled in) as YAML"),
        ("check", "validate a recipe (keys, types, ranges, the model's kwargs): OK or one line naming the problem"),
    ):
        s = actions.add_parser(name, help=help_text)
        s.add_argument("file", nargs="?", help="YAML recipe (omit: the defaults)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from dsnet.train.config import check_model_config, config_reference, load_config

    if args.action == "reference":
        print(config_reference(), end="")
        return 0
    cfg = load_config(args.file, args.overrides)
    if args.action == "show":
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    check_model_config(cfg)
    print(f"{args.file or 'defaults'}: OK")
    return 0
