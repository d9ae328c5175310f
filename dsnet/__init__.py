"""dsnet: dynamic weight slicing (DS-Net, DS-Net++) for CNNs and vision transformers."""

from dsnet.convert import make_dynamic
from dsnet.macs import count_macs
from dsnet.models import DynamicNet, RoutingResult, Subnet, create_model, list_models
from dsnet.models.registry import trust_factories, trusted_factories

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: ``import dsnet`` does not import the training package
    if name in ("load", "LoadedCheckpoint"):
        from dsnet.train.load import LoadedCheckpoint, load

        return {"load": load, "LoadedCheckpoint": LoadedCheckpoint}[name]
    raise AttributeError(f"module 'dsnet' has no attribute {name!r}")


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
    "trust_factories",
    "trusted_factories",
    "__version__",
]
