"""The ``dsnet`` command. Each subcommand lives in its own module with ``add_parser``.

``main`` is the one place where expected failures become one line on stderr
and exit code 2: bad input (``ValueError``, config errors included), missing or
unwritable files (``OSError``), a training run whose loss turned non-finite
(``FloatingPointError``). ``DSNET_DEBUG=1`` shows the traceback instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from dsnet.cli._args import (
    Subcommands,
    add_common_arguments,
    apply_common_arguments,
    join_negative_values,
    leaf_parsers,
)

__all__ = ["EXPECTED_ERRORS", "build_parser", "main", "one_line"]

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, IndexError, FloatingPointError)
_MAX_MESSAGE = 1000  # characters: a message is a line, not a dump


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line too (``--help`` shows the usage).

    Options registered with :func:`~dsnet.cli._args.allow_negative_values` take a negative number (list) as
    the next word: ``--biases -2,-1,0`` (argparse alone would read ``-2,-1,0`` as an option).

    ``subcommands`` lists what ``add_subparsers()`` returned, so the command tree can be walked
    (:func:`~dsnet.cli._args.leaf_parsers`) without argparse's private attributes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.subcommands: list[Subcommands] = []
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Subcommands:  # type: ignore[override]
        group = super().add_subparsers(**kwargs)  # its parsers are _Parser too (argparse's parser_class default)
        self.subcommands.append(group)
        return group

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(
            join_negative_values(words, getattr(self, "negative_value_options", ())), namespace
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsnet", description="Dynamic weight slicing: train, evaluate, benchmark, export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # every public module in this package registers its own subcommand(s); _private ones are helpers
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"dsnet.cli.{info.name}").add_parser(sub)
    for leaf in leaf_parsers(parser):
        leaf.add_argument(
            "--trust-factory",
            dest="trust_factory",
            action="append",
            default=[],
            metavar="MODULE:FUNCTION",
            help="allow a checkpoint or run folder that names this factory model (make_dynamic) to build it; "
            "building it runs its code (repeatable)",
        )
    add_common_arguments(parser)  # --threads on every command
    return parser


def one_line(err: BaseException) -> str:
    """``err`` as one line: whitespace collapsed, capped in length."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "trust_factory", []):  # (the registry imports every model family, and torch)
            from dsnet.models.registry import trust_factories

            trust_factories(args.trust_factory)
        if not getattr(args, "defer_common_arguments", False):  # a command that may not need torch sets them
            apply_common_arguments(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as err:
        if os.environ.get("DSNET_DEBUG"):
            raise
        print(f"dsnet {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
