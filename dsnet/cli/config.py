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


def recipe_line(cfg: dict) -> str:
    """The data recipe training would use (``data recipe (...): 28 px, ...``), measuring an image folder if need be.

    Data that cannot be read here (not downloaded, no folder) gives a line saying so instead of an error: the
    config itself may still be fine for the machine it is meant for.
    """
    from dsnet.data import build_dataset
    from dsnet.data.recipe import describe_recipe

    try:
        _, info = build_dataset(cfg["data"], "train")
    except (OSError, ValueError) as err:
        return f"data recipe: not measured here ({' '.join(str(err).split())[:200]})"
    return describe_recipe(info.recipe, cfg["data"]["augment"])


def run(args: argparse.Namespace) -> int:
    import yaml

    from dsnet.train.config import check_model_config, config_reference, load_config

    if args.action == "reference":
        print(config_reference(), end="")
        return 0
    cfg = load_config(args.file, args.overrides)
    if args.action == "show":
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        print(f"# {recipe_line(cfg)}")  # a YAML comment: the output still loads as the config
        return 0
    check_model_config(cfg)
    print(f"{args.file or 'defaults'}: OK")
    return 0
