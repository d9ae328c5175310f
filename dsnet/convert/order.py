"""Moved to :mod:`dsnet.layers.channel_order` (pretrained imports below the model package use it too).

Kept so ``from dsnet.convert.order import ...`` keeps working.
"""

from dsnet.layers.channel_order import (
    Importance,
    group_permutations,
    l1_importance,
    permute_channels,
    reorder_channels,
)

__all__ = ["Importance", "l1_importance", "group_permutations", "permute_channels", "reorder_channels"]
