"""The ``dsnet`` command. Each subcommand lives in its own module with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsnet", description="Dynamic weight slicing: train, evaluate, benchmark, export."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # every module in this package registers its own subcommand(s)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"dsnet.cli.{info.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, IndexError) as err:
        # user errors (bad config, missing data, unknown model...) get one clear line, not a traceback;
        # DSNET_DEBUG=1 shows the traceback
        if os.environ.get("DSNET_DEBUG"):
            raise
        print(f"dsnet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
