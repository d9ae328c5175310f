"""Compact copies of a dynamic model for one sub-network (for export).

Exporting the sliced model as is would put every *dense* weight into the graph
and slice it there: the file would be the supernet's size whatever the
sub-network. Instead we trace which prefix width each sliceable layer uses for
one sub-network (or for one part of its forward pass) and give a copy of the
model parameters cut down to those prefixes. The sliced layers take the width
off their inputs and weights, so the copy runs the same code with
full-width-of-the-copy weights: no slicing, no dense weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLayerNorm, SlicedLinear, clear_caches
from dsnet.models.base import DynamicNet

__all__ = ["compact_copy"]

_LEAVES = (SlicedConv2d, SlicedLinear, SlicedBatchNorm2d, SlicedLayerNorm)


def _widths_used(model: DynamicNet, run: Callable[[DynamicNet], object]) -> dict[str, tuple[int, int]]:
    """Largest (input width, output width) each sliceable layer sees while ``run(model)`` executes."""
    names = {m: n for n, m in model.named_modules()}
    used: dict[str, tuple[int, int]] = {}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        dim = 1 if isinstance(module, (SlicedConv2d, SlicedBatchNorm2d)) else -1
        i, o = inputs[0].shape[dim], output.shape[dim]
        old = used.get(names[module], (0, 0))
        used[names[module]] = (max(old[0], i), max(old[1], o))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LEAVES)]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return used


def _shrink(module: nn.Module, in_w: int, out_w: int) -> None:
    def cut(name: str, *index: slice) -> None:
        t = getattr(module, name)
        if t is None:
            return
        small = t.detach()[index].clone()
        # nn.Module.__setattr__ keeps a parameter a parameter and a registered buffer a buffer
        setattr(module, name, nn.Parameter(small, requires_grad=False) if isinstance(t, nn.Parameter) else small)

    if isinstance(module, SlicedConv2d):
        cut("weight", slice(0, out_w), slice(0, 1 if module.depthwise else in_w))
        cut("bias", slice(0, out_w))
    elif isinstance(module, SlicedLinear):
        cut("weight", slice(0, out_w), slice(0, in_w))
        cut("bias", slice(0, out_w))
    elif isinstance(module, SlicedBatchNorm2d):
        for name in ("weight", "bias"):
            cut(name, slice(0, out_w))
        for name in ("running_mean", "running_var"):
            cut(name, slice(None), slice(0, out_w))
    elif isinstance(module, SlicedLayerNorm):
        cut("weight", slice(0, out_w))
        cut("bias", slice(0, out_w))
    clear_caches(module)  # views of the old, full-size tensors


def compact_copy(model: DynamicNet, run: Callable[[DynamicNet], object]) -> DynamicNet:
    """A copy of ``model`` whose sliceable layers hold only the prefixes ``run(model)`` uses.

    Layers ``run`` does not call keep nothing but an empty weight, so a graph
    traced through ``run`` on the copy holds exactly the weights it needs.
    Layers that are not dsnet sliceable layers are copied whole.
    """
    used = _widths_used(model, run)
    small = copy.deepcopy(model).eval()
    for name, module in small.named_modules():
        if isinstance(module, _LEAVES):
            in_w, out_w = used.get(name, (0, 0))
            _shrink(module, in_w, out_w)
    return small
