"""dsnet: dynamic weight slicing (DS-Net, DS-Net++) for CNNs and vision transformers."""

from dsnet.convert import make_dynamic
from dsnet.macs import count_macs
from dsnet.models import DynamicNet, RoutingResult, Subnet, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "DynamicNet",
    "RoutingResult",
    "Subnet",
    "count_macs",
    "create_model",
    "list_models",
    "make_dynamic",
    "__version__",
]
