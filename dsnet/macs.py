"""Multiply-add counting with ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees the shapes of the tensors each kernel actually receives, so it
counts sliced layers at their sliced size (hook-based counters read the
module's declared, full size). Multiply-adds are FLOPs / 2. The counting itself
is :func:`dsnet.utils.flops.count_forward_macs` (which the models use for their
own MAC tables); :func:`count_macs` dispatches on the kind of model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dsnet.utils.flops import count_forward_macs
from dsnet.utils.modes import temporary_mode

__all__ = ["count_macs", "count_forward_macs"]


def count_macs(model: nn.Module, inputs: Sequence[int] | Tensor, subnet: int | None = None) -> int | Tensor:
    """Multiply-adds per sample.

    * ``count_macs(model, (1, 3, 224, 224), subnet=3)``: sub-network 3 of a
      dynamic model, or any plain module when ``subnet`` is omitted.
    * ``count_macs(dynamic_model, x)``: a tensor of per-sample MACs of dynamic
      inference on the batch ``x`` (each sample's routed sub-network plus the
      gate's slimming head).
    * ``count_macs(lc_model, x)``: per-sample MACs of an LC-Net on ``x`` (its
      predictors, and the blocks and channels each sample computes).
    """
    from dsnet.models.base import DynamicNet
    from dsnet.models.lcnet import LCResNet

    if isinstance(model, LCResNet):
        if subnet is not None:
            raise ValueError("an LC-Net has no sub-networks: pass a batch of images only")
        if not isinstance(inputs, Tensor):
            raise ValueError("LC-Net MACs depend on the input (skipped blocks, kept channels): pass a batch of images")
        return model.count_macs(inputs)

    dynamic = isinstance(model, DynamicNet)
    if dynamic and subnet is None:
        if not isinstance(inputs, Tensor):
            raise ValueError("dynamic MACs depend on the input: pass a batch of images, or a subnet index")
        with temporary_mode(model, False), torch.inference_mode():
            routing = model.route(inputs)
        table = model.routing_macs(tuple(inputs.shape[1:])).to(torch.int64)
        return table[routing.choice.cpu()]
    if not dynamic and subnet is not None:
        raise ValueError(f"{type(model).__name__} is not a dynamic dsnet model: it has no sub-networks")
    x = inputs if isinstance(inputs, Tensor) else torch.zeros(tuple(inputs), device=_device_of(model))
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"need a batch of at least one sample, got shape {tuple(x.shape)}")
    if dynamic:
        return count_forward_macs(model, lambda: model(x, subnet=subnet), x.shape[0])
    return count_forward_macs(model, lambda: model(x), x.shape[0])


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
