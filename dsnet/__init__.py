"""dsnet: dynamic weight slicing (DS-Net, DS-Net++) for CNNs and vision transformers.

The names below, and the subpackages (``dsnet.models``, ...), are imported when first used
(``dsnet.create_model``, ``from dsnet import make_dynamic``), so ``import dsnet.cli`` or ``import dsnet.utils``
does not import torch and every model family.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "make_dynamic": "dsnet.convert",
    "count_macs": "dsnet.macs",
    "DynamicNet": "dsnet.models",
    "RoutingResult": "dsnet.models",
    "Subnet": "dsnet.models",
    "create_model": "dsnet.models",
    "list_models": "dsnet.models",
    "trust_factories": "dsnet.models.registry",
    "trusted_factories": "dsnet.models.registry",
    "load": "dsnet.train.load",
    "LoadedCheckpoint": "dsnet.train.load",
    "serving_model": "dsnet.bench.serving",
}

if TYPE_CHECKING:  # what the names are, for type checkers and editors (the lazy import below is the same)
    from dsnet.bench.serving import serving_model
    from dsnet.convert import make_dynamic
    from dsnet.macs import count_macs
    from dsnet.models import DynamicNet, RoutingResult, Subnet, create_model, list_models
    from dsnet.models.registry import trust_factories, trusted_factories
    from dsnet.train.load import LoadedCheckpoint, load


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    if name.isidentifier() and not name.startswith("_"):  # a subpackage: ``import dsnet; dsnet.models.base``
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'dsnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "DynamicNet",
    "LoadedCheckpoint",
    "RoutingResult",
    "Subnet",
    "count_macs",
    "create_model",
    "list_models",
    "load",
    "make_dynamic",
    "serving_model",
    "trust_factories",
    "trusted_factories",
    "__version__",
]
