"""Bring your own network: make a plain PyTorch CNN dynamic (``make_dynamic``), order channels by importance."""

from dsnet.convert.channels import ChannelGroup, ChannelUse, Unsliceable
from dsnet.convert.network import FxDynamicNet, make_dynamic
from dsnet.convert.order import l1_importance, reorder_channels

__all__ = [
    "ChannelGroup",
    "ChannelUse",
    "FxDynamicNet",
    "Unsliceable",
    "l1_importance",
    "make_dynamic",
    "reorder_channels",
]
