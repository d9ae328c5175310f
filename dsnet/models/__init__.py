"""Model families (one module each) and the registry."""

from dsnet.models import lcnet, mbv2, mobilenet_v1, resnet, vit  # noqa: F401  (registers the families)
from dsnet.models.base import DynamicNet, RoutingResult, Subnet
from dsnet.models.registry import create_model, list_models, model_info, register_model

__all__ = ["DynamicNet", "RoutingResult", "Subnet", "create_model", "list_models", "model_info", "register_model"]
