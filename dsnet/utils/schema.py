"""Validation tables for config sections: one line per key, the single source of truth.

A section is a dict of ``Key`` entries (or nested sections). Each entry holds
the key's default, its type, its range or choices, which stage reads it and
one line of documentation; ``resolve_section`` merges a given mapping over the
defaults and checks every key, and ``reference_rows`` lists the keys for the
generated reference page (``dsnet config reference``). Adding a key is one
line::

    "tau": Float(1.0, "(0, inf)", doc="Gumbel-softmax temperature"),

Every error is a ``ConfigError`` (a ``ValueError``) whose message starts with
the dotted key, so the command line prints one line that names it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "Interval",
    "Key",
    "Int",
    "Float",
    "Bool",
    "Str",
    "Choice",
    "PathKey",
    "Numbers",
    "Mapping",
    "Device",
    "with_stage",
    "section_defaults",
    "resolve_section",
    "reference_rows",
    "load_yaml",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message starts with the key's dotted name."""


_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?inf|-?[\d.eE+-]+)\s*,\s*(-?inf|-?[\d.eE+-]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    """A range written as in mathematics: ``"[0, 1)"``, ``"(0, inf)"``, ``"[1, inf)"``."""

    text: str

    def __post_init__(self) -> None:
        if not _INTERVAL.match(self.text):
            raise ValueError(f"bad interval {self.text!r}; write e.g. '[0, 1)' or '(0, inf)'")

    @property
    def bounds(self) -> tuple[float, float, bool, bool]:
        """``(lo, hi, lo_included, hi_included)``."""
        lo_bracket, lo, hi, hi_bracket = _INTERVAL.match(self.text).groups()
        return float(lo), float(hi), lo_bracket == "[", hi_bracket == "]"

    def contains(self, value: float) -> bool:
        lo, hi, lo_in, hi_in = self.bounds
        if math.isnan(value):
            return False
        return (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Key:
    """One config key. ``kind`` is the value's type (see the constructors below)."""

    default: Any
    kind: str
    range: Interval | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    length: int | None = None  # for ``numbers``: exactly this many
    nonempty: bool = False  # for ``numbers``: at least one
    stage: str = ""
    doc: str = ""

    def type_name(self) -> str:
        names = {
            "int": "int",
            "float": "float",
            "bool": "bool",
            "str": "str",
            "choice": " or ".join(dict.fromkeys(type(c).__name__ for c in self.choices or ())) or "str",
            "path": "path",
            "numbers": f"list of {self.length} numbers" if self.length else "list of numbers",
            "mapping": "mapping",
            "device": "str",
        }
        return names[self.kind] + (" or null" if self.nullable else "")

    def constraint(self) -> str:
        """The range or choices, as the reference page and error messages write them."""
        if self.choices:
            return ", ".join(str(c) for c in self.choices)
        if self.kind == "device":
            return "auto, cpu, cuda, cuda:N"
        if self.range is not None:
            return ("each in " if self.kind == "numbers" else "") + str(self.range)
        return ""


def Int(default: int | None, range: str, *, null: bool = False, stage: str = "", doc: str = "") -> Key:
    return Key(default, "int", Interval(range), nullable=null, stage=stage, doc=doc)


def Float(default: float | None, range: str, *, null: bool = False, stage: str = "", doc: str = "") -> Key:
    return Key(default, "float", Interval(range), nullable=null, stage=stage, doc=doc)


def Bool(default: bool | None, *, null: bool = False, stage: str = "", doc: str = "") -> Key:
    return Key(default, "bool", nullable=null, stage=stage, doc=doc)


def Str(default: str | None, *, null: bool = False, stage: str = "", doc: str = "") -> Key:
    return Key(default, "str", nullable=null, stage=stage, doc=doc)


def Choice(default: Any, choices: Sequence[Any], *, null: bool = False, stage: str = "", doc: str = "") -> Key:
    return Key(default, "choice", choices=tuple(choices), nullable=null, stage=stage, doc=doc)


def PathKey(default: str | None, *, null: bool = False, stage: str = "", doc: str = "") -> Key:
    return Key(default, "path", nullable=null, stage=stage, doc=doc)


def Numbers(
    default: list[float] | None,
    range: str,
    *,
    length: int | None = None,
    nonempty: bool = False,
    null: bool = False,
    stage: str = "",
    doc: str = "",
) -> Key:
    """A list of numbers, each in ``range``; ``length``: exactly that many; ``nonempty``: at least one."""
    return Key(
        default, "numbers", Interval(range), nullable=null, length=length, nonempty=nonempty, stage=stage, doc=doc
    )


def Mapping(default: dict | None = None, *, stage: str = "", doc: str = "") -> Key:
    """A free-form mapping (e.g. ``model.kwargs``), validated by whoever reads it."""
    return Key(default or {}, "mapping", stage=stage, doc=doc)


def Device(default: str = "auto", *, stage: str = "", doc: str = "") -> Key:
    return Key(default, "device", stage=stage, doc=doc)


_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def with_stage(section: dict[str, Any], stage: str) -> dict[str, Any]:
    """``section`` with ``stage`` filled in for every key (nested too) that names none."""
    out: dict[str, Any] = {}
    for name, entry in section.items():
        if isinstance(entry, dict):
            out[name] = with_stage(entry, stage)
        else:
            out[name] = entry if entry.stage else replace(entry, stage=stage)
    return out


def section_defaults(section: dict[str, Any]) -> dict[str, Any]:
    """The plain defaults mapping of a section (nested sections as nested dicts)."""
    return {
        name: section_defaults(entry) if isinstance(entry, dict) else _copy(entry.default)
        for name, entry in section.items()
    }


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(name: str, key: Key, value: Any) -> Any:
    """``value`` checked against ``key`` (and normalised: ints for float keys become floats)."""
    if value is None:
        if key.nullable:
            return None
        raise ConfigError(f"{name}: must not be null (expected {key.type_name()}, default {key.default!r})")
    got = f"got {type(value).__name__} {value!r}"
    kind = key.kind
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected int, {got}")
    elif kind == "float":
        if isinstance(value, str) and _EXPONENT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is plainly a number
        if not _is_number(value):
            raise ConfigError(f"{name}: expected a number, {got}")
        value = float(value)  # nan and inf fall outside every range (checked below)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected bool (true or false), {got}")
    elif kind == "choice":
        # the value must be one of the choices with the same type: 1 is not True, "true" is not True
        if not any(type(value) is type(c) and value == c for c in key.choices):
            raise ConfigError(f"{name}: must be one of {', '.join(map(str, key.choices))}, got {value!r}")
    elif kind in ("str", "device"):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected str, {got}")
    elif kind == "path":
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{name}: expected a path, {got}")
        value = os.fspath(value)
    elif kind == "numbers":
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            raise ConfigError(f"{name}: expected a {key.type_name()}, {got}")
        if key.length is not None and len(value) != key.length:
            raise ConfigError(f"{name}: expected a {key.type_name()}, got {len(value)}: {list(value)!r}")
        if key.nonempty and not value:
            raise ConfigError(f"{name}: must not be empty (expected a {key.type_name()}, default {key.default!r})")
        bad = [v for v in value if not key.range.contains(float(v))]
        if bad:
            raise ConfigError(f"{name}: every value must be in {key.range}, got {list(value)!r}")
        return [float(v) for v in value]
    elif kind == "mapping":
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, {got}")
        return _copy(value)
    if kind in ("int", "float") and not key.range.contains(value):
        raise ConfigError(f"{name}: must be in {key.range}, got {value!r}")
    if kind == "device" and not _DEVICE.match(value):
        raise ConfigError(f"{name}: unknown device {value!r}; use {key.constraint()}")
    return value


def resolve_section(section: dict[str, Any], given: Any, prefix: str) -> dict[str, Any]:
    """The defaults of ``section`` overlaid with ``given``, every key checked; errors name ``prefix.key``."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(given).__name__} {given!r}")
    out = section_defaults(section)
    for name, value in given.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name not in section:
            raise ConfigError(f"{dotted}: unknown key; known: {', '.join(section)}")
        entry = section[name]
        if isinstance(entry, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {', '.join(entry)}, got {value!r}")
            out[name] = resolve_section(entry, value, dotted)
        else:
            out[name] = check_value(dotted, entry, value)
    return out


def reference_rows(section: dict[str, Any], prefix: str) -> list[tuple[str, Key]]:
    """``(dotted name, Key)`` for every key of ``section``, in table order."""
    rows: list[tuple[str, Key]] = []
    for name, entry in section.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if isinstance(entry, dict):
            rows.extend(reference_rows(entry, dotted))
        else:
            rows.append((dotted, entry))
    return rows


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming a key twice (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # before merging: keys a merge (<<) brings in may be overridden on purpose
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the constructor below reports unhashable keys
        if key in seen:
            raise ConfigError(
                f"{key}: key given twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "keep one"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, source: str = "") -> Any:
    """YAML ``text`` parsed safely (plain data only), refusing duplicate keys: ``ConfigError`` naming ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None
