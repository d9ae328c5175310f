"""Bring your own network: make a plain PyTorch CNN dynamic (``make_dynamic``), order channels by importance.

The channel-group analysis and the importance order live in :mod:`dsnet.layers` (``channel_groups``,
``channel_order``; pretrained imports order channels too); they are re-exported here.
"""

from dsnet.convert.network import FxDynamicNet, make_dynamic
from dsnet.layers.channel_groups import ChannelGroup, ChannelUse, Unsliceable
from dsnet.layers.channel_order import l1_importance, reorder_channels

__all__ = [
    "ChannelGroup",
    "ChannelUse",
    "FxDynamicNet",
    "Unsliceable",
    "l1_importance",
    "make_dynamic",
    "reorder_channels",
]
