"""The zero-masking baseline: what masking-based dynamic networks pay.

Many dynamic-width methods keep the full network and *mask* channels: every
layer computes at full width and the channels beyond the chosen width are
multiplied by zero. The result equals the narrow sub-network's, but the
compute is the wide one's. Weight slicing exists to avoid exactly that, so the
benchmark measures this baseline honestly: the same model, run at the widths
of the widest routed sub-network, with each sliceable layer's output
multiplied by a 0/1 channel mask for sub-network ``k``.

It is generic over :class:`~dsnet.models.base.DynamicNet`: a traced run of
sub-network ``k`` and of the widest one records, call by call, each sliceable
layer's output width; the masked run then asks each layer for the wide width
and masks the result down to ``k``'s. BatchNorm statistics slots stay those of
``k`` (a masking network keeps per-width statistics too), so the output
matches ``model(x, subnet=k)`` up to float rounding.

Limitation: a LayerNorm over zero-padded features does not equal the sliced
LayerNorm (its statistics count the zeros), so for transformer families this
baseline computes the right cost but not the same output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLayerNorm, SlicedLinear
from dsnet.models.base import DynamicNet

__all__ = ["ZeroMaskBaseline", "trace_widths"]

_LEAVES = (SlicedConv2d, SlicedLinear, SlicedBatchNorm2d, SlicedLayerNorm)


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, (SlicedConv2d, SlicedBatchNorm2d)) else -1


def trace_widths(model: DynamicNet, x: Tensor, subnet: int) -> list[tuple[nn.Module, int, int]]:
    """``(module, output width, output ndim)`` of every sliceable-layer call of ``model(x, subnet=subnet)``."""
    calls: list[tuple[nn.Module, int, int]] = []

    def hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        calls.append((module, output.shape[_channel_dim(module)], output.dim()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LEAVES)]
    try:
        with torch.inference_mode():
            model(x, subnet=subnet)
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass
class _Call:
    module: nn.Module
    wide: int  # output width computed
    mask: Tensor | None  # 1 for the first ``k`` channels, 0 beyond; None where k is as wide


class ZeroMaskBaseline:
    """Callable ``baseline(x)``: sub-network ``subnet``'s output, computed at ``wide``'s widths and masked.

    Args:
        model: the dynamic model (eval mode).
        subnet: the sub-network whose output the mask reproduces.
        wide: the sub-network whose widths are computed (default: the widest routed one).
        example: an input of the shape to run (only its shape matters; it is traced once).
    """

    def __init__(self, model: DynamicNet, subnet: int, example: Tensor, wide: int | None = None) -> None:
        self.model = model
        self.subnet = model.check_subnet(subnet)
        self.wide = model.check_subnet(max(model.routing_space) if wide is None else wide)
        probe = example[:1]
        narrow_calls = trace_widths(model, probe, self.subnet)
        wide_calls = trace_widths(model, probe, self.wide)
        if [id(c[0]) for c in narrow_calls] != [id(c[0]) for c in wide_calls]:
            raise ValueError(
                f"sub-networks {self.subnet} and {self.wide} call different layers; no masking baseline exists"
            )
        self.calls: list[_Call] = []
        for (module, k, ndim), (_, w, _) in zip(narrow_calls, wide_calls):
            if k > w:
                raise ValueError(f"sub-network {self.subnet} is wider than {self.wide} at {type(module).__name__}")
            mask = None
            if k < w:
                ref = next(module.parameters())
                mask = torch.zeros(w, dtype=ref.dtype, device=ref.device)
                mask[:k] = 1
                if _channel_dim(module) == 1:
                    mask = mask.view(1, w, *([1] * (ndim - 2)))
            self.calls.append(_Call(module, w, mask))
        self._pos = 0

    @property
    def masked_layers(self) -> int:
        """How many layer outputs are masked (the layers that run wider than needed)."""
        return sum(c.mask is not None for c in self.calls)

    def _next(self, module: nn.Module) -> _Call:
        call = self.calls[self._pos]
        if call.module is not module:
            raise RuntimeError("masked run diverged from the traced call order")
        self._pos += 1
        return call

    def _patched(self, module: nn.Module):
        forward = type(module).forward.__get__(module)
        takes_width = isinstance(module, SlicedLinear) or (isinstance(module, SlicedConv2d) and not module.depthwise)

        def masked_forward(x: Tensor, *args, **kwargs) -> Tensor:
            call = self._next(module)
            if takes_width:  # compute the wide output, whatever width the model asked for
                args, kwargs = (call.wide,), {}
            y = forward(x, *args, **kwargs)
            return y if call.mask is None else y * call.mask

        return masked_forward

    @contextmanager
    def _installed(self) -> Iterator[None]:
        modules = {id(c.module): c.module for c in self.calls}.values()
        for m in modules:
            m.forward = self._patched(m)  # instance attribute shadows the class method
        self._pos = 0
        try:
            yield
        finally:
            for m in modules:
                del m.forward

    def __call__(self, x: Tensor) -> Tensor:
        with self._installed():
            out = self.model(x, subnet=self.subnet)
        if self._pos != len(self.calls):
            raise RuntimeError("masked run made fewer layer calls than traced")
        return out
