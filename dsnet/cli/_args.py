"""Argument types shared by the subcommands: numbers with their range, devices, output paths.

Each is checked while the command line is parsed, before any work starts, and
a bad value is one line naming the option (see ``dsnet.cli.main``). Output
paths are checked for writability then, so a long run cannot die at its last
step because its ``--json`` names a folder or a read-only place.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from typing import Any, Protocol

from dsnet.utils.allocator import ALLOCATOR_SETTINGS, steady_allocator
from dsnet.utils.io import check_output_dir, check_output_file

__all__ = [
    "Subcommands",
    "leaf_parsers",
    "add_common_arguments",
    "apply_common_arguments",
    "allow_negative_values",
    "join_negative_values",
    "positive_int",
    "nonnegative_int",
    "device_name",
    "output_file",
    "output_dir",
]

_TIMING = frozenset({"bench", "compare", "quickstart"})  # commands whose output includes timings
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_NEGATIVE_NUMBERS = re.compile(r"^-\.?\d[\d.,eE+\-]*$")  # "-2", "-.5", "-1e-3", "-2,-1,0"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def device_name(text: str, allow_auto: bool = False) -> str:
    if (allow_auto and text == "auto") or _DEVICE.match(text):
        return text
    choices = "auto, cpu, cuda, cuda:N" if allow_auto else "cpu, cuda, cuda:N"
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {choices}")


def device_or_auto(text: str) -> str:
    return device_name(text, allow_auto=True)


def allow_negative_values(parser: argparse.ArgumentParser, *options: str) -> None:
    """Let ``OPTION -2,-1,0`` through for these options of ``parser`` (``OPTION=-2,-1,0`` always works).

    argparse reads a word that starts with ``-`` and is not a plain number (``-2,-1,0``) as an option, so
    ``--biases -2,-1,0`` would be "expected one argument". The dsnet parser (``dsnet.cli``) rewrites such a
    pair as ``--biases=-2,-1,0`` before parsing (:func:`join_negative_values`), for the options named here.
    """
    parser.negative_value_options = (*getattr(parser, "negative_value_options", ()), *options)


def join_negative_values(args: list[str], options: Iterable[str]) -> list[str]:
    """``args`` with ``OPTION VALUE`` written ``OPTION=VALUE`` where VALUE is a negative number (list).

    ``OPTION`` is one of ``options`` or an unambiguous-looking abbreviation of one (argparse accepts those and
    reports an ambiguous one itself). Nothing after ``--`` changes.
    """
    options = tuple(options)
    if not options:
        return list(args)
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            out += args[i:]
            break
        takes_negative = word.startswith("--") and len(word) > 2 and "=" not in word
        if takes_negative and any(o.startswith(word) for o in options) and i + 1 < len(args):
            if _NEGATIVE_NUMBERS.match(args[i + 1]):
                out.append(f"{word}={args[i + 1]}")
                i += 2
                continue
        out.append(word)
        i += 1
    return out


def _output(check, text: str) -> str:
    try:
        check(text, "")
    except OSError as err:
        raise argparse.ArgumentTypeError(str(err).strip()) from None
    return text


def output_file(text: str) -> str:
    """A file path that can be written (not a folder, not under a file, not on a read-only filesystem)."""
    return _output(check_output_file, text)


def output_dir(text: str) -> str:
    """A folder path that can be created or written."""
    return _output(check_output_dir, text)


class Subcommands(Protocol):
    """What ``add_subparsers()`` returns, as each command module's ``add_parser(sub)`` uses it."""

    required: bool
    choices: dict[str, argparse.ArgumentParser]

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (``dsnet eval``, ``dsnet train gate``), not those that only dispatch.

    The dsnet parser (``dsnet.cli``) records what each of its ``add_subparsers()`` calls returned, in
    ``subcommands``; a subcommand's parser is of the same class, so the walk reaches every level. Each
    subcommand group's ``choices`` maps a name (or an alias: hence the de-duplication) to its parser.
    """
    groups = getattr(parser, "subcommands", ())
    if not groups:
        return [parser]
    return [leaf for g in groups for child in dict.fromkeys(g.choices.values()) for leaf in leaf_parsers(child)]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every command takes: ``--threads N`` (a command that defines its own keeps it), ``--allocator``."""
    for leaf in leaf_parsers(parser):
        try:
            leaf.add_argument(
                "--threads",
                type=positive_int,
                default=None,
                metavar="N",
                help="torch threads (default: the config's threads, else min(cores available, 8))",
            )
        except argparse.ArgumentError:  # a conflicting option string: the command defines its own --threads
            pass
        leaf.add_argument(
            "--allocator",
            choices=ALLOCATOR_SETTINGS,
            default="steady",
            help="steady (default): fix glibc malloc's mmap and trim thresholds, so activations are not mapped "
            "afresh on every call (steadier and faster timings on Linux); system: leave malloc as it is",
        )


def apply_common_arguments(args: argparse.Namespace) -> None:
    """Act on the common options before the command runs: set the thread count (once, for the process) and
    the allocator's setting (:func:`dsnet.utils.allocator.steady_allocator`)."""
    from dsnet.utils.threads import set_threads, warn_line

    if getattr(args, "allocator", "steady") == "steady":
        steady_allocator()

    timing = getattr(args, "command", None) in _TIMING  # the oversubscription warning where timings are reported
    set_threads(getattr(args, "threads", None), warn=warn_line if timing else None)


def check_input_size(model, side: int | None, option: str = "--input-size") -> tuple[int, int, int]:
    """The model's input size at image side ``side`` (None: its default), after one forward proves it runs.

    A side that is too small for the model's strides or kernels, or that a
    vision transformer's position embedding does not fit, is a one-line
    ``ValueError`` naming ``option`` instead of a convolution's traceback.
    """
    import torch

    size = tuple(model.default_input_size) if side is None else (model.in_chans, side, side)
    if side is None:
        return size
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *size), subnet=len(model.subnets) - 1)
    except (RuntimeError, ValueError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{option} {side}: the model cannot run on {side}x{side} images "
            f"(default {model.default_input_size[-1]}): {first}"
        ) from None
    finally:
        model.train(was_training)
    return size
