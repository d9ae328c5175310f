"""Multiply-add counting of a forward pass with ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees the shapes of the tensors each kernel actually receives, so it
counts sliced layers at their sliced size (hook-based counters read the
module's declared, full size). Multiply-adds are FLOPs / 2. This is the
model-agnostic core; :func:`dsnet.macs.count_macs` dispatches on the kind of
model (a sub-network, dynamic inference on a batch, an LC-Net).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dsnet.utils.modes import temporary_mode

__all__ = ["count_forward_macs"]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels (flash, efficient, cuDNN) but not for the
# CPU one, so on a CPU the attention matmuls (2 L^2 d per head) would go uncounted and a ViT's MACs would
# depend on the device. The CPU kernel computes the same product, so it gets the same formula.
_CUSTOM_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_forward_macs(model: nn.Module, forward: Callable[[], object], batch: int) -> int:
    """Multiply-adds per sample of ``forward()`` (any part of ``model``), eval mode, no gradient."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS)
    with temporary_mode(model, False), torch.no_grad(), counter:
        forward()
    return int(counter.get_total_flops() // 2 // batch)
