"""Moved to :mod:`dsnet.layers.channel_groups` (pretrained imports below the model package use it too).

Kept so ``from dsnet.convert.channels import ...`` keeps working.
"""

from dsnet.layers.channel_groups import Chan, ChannelGraph, ChannelGroup, ChannelUse, Unsliceable, analyse, trace

__all__ = ["ChannelUse", "ChannelGroup", "Unsliceable", "Chan", "ChannelGraph", "analyse", "trace"]
