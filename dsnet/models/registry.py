"""Model registry: ``create_model(name, **kwargs)`` and ``list_models()``.

A name is a registered model (``"ds_resnet50"``) or a user factory written
``"package.module:function"``, imported on demand: training configs, checkpoints
and the CLI accept both, so a network made dynamic with ``dsnet.make_dynamic``
trains and reloads like a registered one.

A factory name is code: building it imports a module and calls a function.
It runs only when the *user* names it -- a ``create_model`` call, a recipe
given to a training command, ``--model`` -- or allows it explicitly
(:func:`trust_factories`, ``--trust-factory NAME``, the environment variable
``DSNET_TRUSTED_FACTORIES=a:b,c:d``). A name read from a file (a checkpoint,
a run folder's config) is checked with :func:`check_factory_trusted` before
anything is imported, as ``torch.load(weights_only=True)`` refuses globals
that ``torch.serialization.add_safe_globals`` did not allow.

The families register their models (``@register_model``) when they are
imported, which ``dsnet.models`` does: importing this module always imports
that package first, so the registry is complete whenever it can be used.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "is_factory_name",
    "trust_factories",
    "trusted_factories",
    "is_trusted_factory",
    "check_factory_trusted",
    "TRUSTED_FACTORIES_ENV",
]

TRUSTED_FACTORIES_ENV = "DSNET_TRUSTED_FACTORIES"
_FACTORY_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TRUSTED: set[str] = set()  # factory names the user allowed in this process (trust_factories)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    input_size: int
    description: str
    kind: str = "supernet"  # "supernet": a DynamicNet (DS-Net); "lcnet": an LC-Net (dsnet.models.lcnet)


KINDS = ("supernet", "lcnet")


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    input_size: int, kind: str = "supernet"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory under its function name; ``input_size`` is its native resolution, ``kind`` its API.

    ``kind="supernet"``: a :class:`~dsnet.models.base.DynamicNet` (sub-networks,
    gate, extraction); ``kind="lcnet"``: an LC-Net (per-input block and channel
    skipping, :mod:`dsnet.models.lcnet`), which has no sub-networks.
    """
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} registered twice")
        doc = (inspect.getdoc(fn) or "").splitlines()
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, input_size, doc[0] if doc else "", kind)
        return fn

    return wrap


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, all of them or those of one ``kind`` ("supernet" or "lcnet")."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return sorted(name for name, e in _REGISTRY.items() if kind is None or e.kind == kind)


def model_info(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, checkpoint_path: str | os.PathLike | Mapping | None = None, **kwargs) -> nn.Module:
    """Build a registered model (or a ``"package.module:factory"`` one), optionally from pretrained weights.

    ``checkpoint_path``: weights to start from (a file, or a state dict), in any format the model imports
    (dsnet checkpoints, torchvision/timm, the official DS-Net release; see
    :mod:`dsnet.models.pretrained`). Unknown names and arguments are errors
    that say what is known.
    """
    factory = _factory(name)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        accepted = _accepted_arguments(str(err)) or _signature_arguments(factory)
        raise ValueError(f"{name}: {err}; accepted arguments: {', '.join(accepted)}") from None
    if checkpoint_path is not None:
        from dsnet.models.pretrained import load_pretrained

        load_pretrained(model, checkpoint_path)
    return model


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a user factory (``"package.module:function"``), not a registered model."""
    return ":" in name


def _checked_names(names: Iterable[str] | str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if not isinstance(name, str) or not _FACTORY_NAME.match(name):
            raise ValueError(f"trusted factory {name!r}: expected 'package.module:function'")
    return names


def trust_factories(names: Iterable[str] | str) -> None:
    """Allow these ``module:function`` factories to be built when a file (a checkpoint, a run's config) names them.

    For the rest of the process; :func:`trusted_factories` allows them for a ``with`` block only.
    Only allow a factory whose code you trust: building it imports its module and calls it.
    """
    _TRUSTED.update(_checked_names(names))


@contextlib.contextmanager
def trusted_factories(names: Iterable[str] | str) -> Iterator[None]:
    """:func:`trust_factories` for the duration of a ``with`` block."""
    added = [n for n in _checked_names(names) if n not in _TRUSTED]
    _TRUSTED.update(added)
    try:
        yield
    finally:
        _TRUSTED.difference_update(added)


def _env_trusted() -> set[str]:
    return {n.strip() for n in os.environ.get(TRUSTED_FACTORIES_ENV, "").split(",") if n.strip()}


def is_trusted_factory(name: str, extra: Iterable[str] = ()) -> bool:
    """A registered model name (no code of the file's choosing), or a factory the user allowed."""
    return not is_factory_name(name) or name in _TRUSTED or name in set(extra) or name in _env_trusted()


def check_factory_trusted(name: str, source: str, extra: Iterable[str] = ()) -> None:
    """Refuse a factory name that ``source`` (a file) asks for and the user did not allow; nothing is imported."""
    if is_trusted_factory(name, extra):
        return
    raise ValueError(
        f"{source} names the factory model {name!r}: building it would import and run that code, so nothing "
        f"was built or imported. If you trust it, allow it: --trust-factory {name} (Python: "
        f"dsnet.trust_factories([{name!r}]); or {TRUSTED_FACTORIES_ENV}={name})"
    )


def _factory(name: str) -> Callable[..., nn.Module]:
    """The factory a name stands for: a registered model, or ``module:function`` imported on demand."""
    if ":" not in name:
        return model_info(name).factory
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: module {module_name!r} has no function {attr!r}")
    return factory


def _signature_arguments(factory: Callable[..., nn.Module]) -> list[str]:
    try:
        return sorted(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return []


def _model_classes() -> list[type]:
    """Every module class built on one defined in ``dsnet.models`` (DynamicNet's and the LC-Net's families)."""
    pending, seen = list(nn.Module.__subclasses__()), {}
    while pending:
        cls = pending.pop()
        if cls not in seen:
            seen[cls] = None
            pending.extend(cls.__subclasses__())
    return [
        c
        for c in seen
        if any(b.__module__.startswith("dsnet.models.") for b in c.__mro__ if b not in (nn.Module, object))
    ]


def _accepted_arguments(message: str) -> list[str]:
    """Constructor arguments of the model class a TypeError message names."""
    named = [c for c in _model_classes() if f"{c.__name__}.__init__" in message]
    if not named:
        return []
    return sorted(p for p in inspect.signature(named[0].__init__).parameters if p != "self")
