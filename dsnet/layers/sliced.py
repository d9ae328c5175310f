"""Sliceable layers: one dense weight, used as a prefix slice ``W[:k_out, :k_in]``.

The width of every call is passed explicitly through ``forward`` (output width
as an argument, input width read off the input tensor); nothing is stored on the
module between calls, so the same module can serve several widths in one batch
loop, in several threads, or under autograd without any global state.

Each layer can hand back its static equivalent (``to_static``): a plain
``torch.nn`` layer holding compact copies of the sliced weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TensorCache",
    "SliceableModule",
    "SlicedConv2d",
    "SlicedLinear",
    "SlicedBatchNorm2d",
    "SlicedLayerNorm",
]


class SliceableModule(nn.Module):
    """Marker base class: a module whose weights are used as prefix slices."""


class TensorCache:
    """Contiguous tensors derived from a parameter, for inference only.

    Slicing the *input* dimension of a weight (``W[:, :k_in]``) gives a strided
    view; convolution kernels copy such a view on every call. At inference we
    keep one contiguous copy per slice shape instead (the ViT also keeps its
    resampled position embeddings here). An entry is valid only for the exact
    storage and version counter of the parameter it was made from, so any
    in-place update (optimiser step, ``load_state_dict``, ``.to()``)
    invalidates it without anyone having to remember to clear it. While a
    gradient is being recorded for the parameter the cache is bypassed:
    training must differentiate through the slicing.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple, Tensor]] = {}

    def get(self, param: Tensor, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        if (torch.is_grad_enabled() and param.requires_grad) or torch.compiler.is_compiling():
            return make()  # training differentiates through it; export/compile trace it
        stamp = (param._version, param.data_ptr(), param.dtype, param.device)
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():
                entry = (stamp, make().contiguous())
            self._entries[key] = entry
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _stamp(*tensors: Tensor | None) -> tuple:
    """What makes cached views/copies of these tensors stale: an in-place update or new storage."""
    return tuple((t._version, t.data_ptr()) for t in tensors if t is not None)


def _slice_rows_cols(param: Tensor, rows: int, cols: int | None, cache: TensorCache) -> Tensor:
    """``param[:rows, :cols]``, contiguous and cached when no gradient is being recorded."""
    full_rows = rows == param.shape[0]
    full_cols = cols is None or cols == param.shape[1]
    if full_rows and full_cols:
        return param
    view = param[:rows] if full_cols else param[:rows, :cols]
    if view.is_contiguous() or torch.is_grad_enabled():
        return view
    return cache.get(param, (rows, cols), lambda: param[:rows, :cols])


class SlicedConv2d(SliceableModule):
    """2-D convolution (dense, pointwise or depthwise) over a prefix of its channels.

    ``forward(x, out_channels)`` uses the first ``x.shape[1]`` input channels and
    the first ``out_channels`` filters. A depthwise convolution has as many
    outputs as inputs, so it takes no ``out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        depthwise: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise convolution has as many output as input channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = (kernel_size - 1) // 2 * dilation if padding is None else padding
        self.dilation = dilation
        self.depthwise = depthwise
        in_per_group = 1 if depthwise else in_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_per_group, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # He init on fan-out; a depthwise kernel's fan-out is k*k (torch's kaiming_normal_
        # would count k*k*channels, as it cannot see the groups, and start it near zero)
        fan_out = kernel_size * kernel_size * (1 if depthwise else out_channels)
        nn.init.normal_(self.weight, std=(2.0 / fan_out) ** 0.5)
        self._cache = TensorCache()
        self._args: dict[tuple, tuple] = {}

    def _widths(self, x: Tensor, out_channels: int | None) -> tuple[int, int]:
        in_ch = x.shape[1]
        if in_ch > self.in_channels:
            raise ValueError(f"{type(self).__name__} holds {self.in_channels} input channels, got {in_ch}")
        if self.depthwise:
            return in_ch, in_ch
        out_ch = self.out_channels if out_channels is None else out_channels
        if not 0 < out_ch <= self.out_channels:
            raise ValueError(f"{type(self).__name__} holds {self.out_channels} output channels, asked for {out_ch}")
        return in_ch, out_ch

    def forward(self, x: Tensor, out_channels: int | None = None) -> Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference fast path: the sliced (weight, bias, groups) of this width pair are built
            # once, so a call costs one dict lookup instead of validation plus 2-4 slicing ops
            key = (x.shape[1], out_channels)
            stamp = _stamp(self.weight, self.bias)
            hit = self._args.get(key)
            if hit is None or hit[0] != stamp:
                hit = (stamp, self._conv_args(x, out_channels))
                self._args[key] = hit
            weight, bias, groups = hit[1]
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)
        weight, bias, groups = self._conv_args(x, out_channels)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _conv_args(self, x: Tensor, out_channels: int | None) -> tuple[Tensor, Tensor | None, int]:
        in_ch, out_ch = self._widths(x, out_channels)
        cols = None if self.depthwise else in_ch
        weight = _slice_rows_cols(self.weight, out_ch, cols, self._cache)
        bias = None if self.bias is None else self.bias[:out_ch]
        return weight, bias, in_ch if self.depthwise else 1

    def to_static(self, in_channels: int, out_channels: int | None = None) -> nn.Conv2d:
        out_channels = in_channels if self.depthwise else (out_channels or self.out_channels)
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            groups=in_channels if self.depthwise else 1,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            cols = 1 if self.depthwise else in_channels
            conv.weight.copy_(self.weight[:out_channels, :cols])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_channels])
        return conv.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        kind = "depthwise, " if self.depthwise else ""
        return (
            f"{self.in_channels}, {self.out_channels}, {kind}kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bias={self.bias is not None}"
        )


class SlicedLinear(SliceableModule):
    """Linear layer over a prefix of its input and output features.

    The input width is read off ``x.shape[-1]``; the output width is passed in
    (default: all).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        ref = nn.Linear(in_features, out_features, bias=bias)  # torch's default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self._cache = TensorCache()
        self._args: dict[tuple, tuple] = {}

    def forward(self, x: Tensor, out_features: int | None = None) -> Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # inference fast path, as SlicedConv2d's
            key = (x.shape[-1], out_features)
            stamp = _stamp(self.weight, self.bias)
            hit = self._args.get(key)
            if hit is None or hit[0] != stamp:
                hit = (stamp, self._linear_args(x, out_features))
                self._args[key] = hit
            return F.linear(x, *hit[1])
        return F.linear(x, *self._linear_args(x, out_features))

    def _linear_args(self, x: Tensor, out_features: int | None) -> tuple[Tensor, Tensor | None]:
        in_f = x.shape[-1]
        if in_f > self.in_features:
            raise ValueError(f"SlicedLinear holds {self.in_features} input features, got {in_f}")
        out_f = self.out_features if out_features is None else out_features
        if not 0 < out_f <= self.out_features:
            raise ValueError(f"SlicedLinear holds {self.out_features} output features, asked for {out_f}")
        weight = _slice_rows_cols(self.weight, out_f, in_f, self._cache)
        bias = None if self.bias is None else self.bias[:out_f]
        return weight, bias

    def to_static(self, in_features: int, out_features: int | None = None) -> nn.Linear:
        out_features = out_features or self.out_features
        lin = nn.Linear(in_features, out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight[:out_features, :in_features])
            if self.bias is not None:
                lin.bias.copy_(self.bias[:out_features])
        return lin.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SlicedBatchNorm2d(SliceableModule):
    """BatchNorm with shared affine prefixes and private running statistics.

    The scale and shift are prefixes of the widest layer's (they are trained by
    every sub-network). The running mean and variance are kept once per
    *statistics slot*: a sub-network's features have their own distribution,
    so sharing statistics between widths would make all but one of them wrong.
    The network decides which slot a call uses (``forward(x, slot)``); slots
    are rows of a ``(num_slots, num_features)`` buffer, so the whole state is
    an ordinary state dict.

    With ``momentum=None`` the statistics are a cumulative average over the
    batches seen since the last reset, as recalibration wants.
    """

    def __init__(self, num_features: int, num_slots: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_slots = num_slots
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_slots, num_features))
        self.register_buffer("running_var", torch.ones(num_slots, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_slots, dtype=torch.long))
        self.sync = False  # statistics over all DDP ranks (set by dsnet.train on multi-GPU runs; CUDA only)
        self._args: dict[tuple, tuple] = {}

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, slot: int) -> Tensor:
        if not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference fast path: the four (slot, width) views are built once, not per call
            key = (slot, x.shape[1])
            stamp = _stamp(self.weight, self.bias, self.running_mean, self.running_var)
            hit = self._args.get(key)
            if hit is None or hit[0] != stamp:
                ch = x.shape[1]
                if ch > self.num_features:
                    raise ValueError(f"SlicedBatchNorm2d holds {self.num_features} channels, got {ch}")
                views = (self.running_mean[slot, :ch], self.running_var[slot, :ch], self.weight[:ch], self.bias[:ch])
                hit = (stamp, views)
                self._args[key] = hit
            mean, var, weight, bias = hit[1]
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        ch = x.shape[1]
        if ch > self.num_features:
            raise ValueError(f"SlicedBatchNorm2d holds {self.num_features} channels, got {ch}")
        mean = self.running_mean[slot, :ch]
        var = self.running_var[slot, :ch]
        factor = 0.0
        if self.training:
            self.num_batches_tracked[slot] += 1
            factor = 1.0 / float(self.num_batches_tracked[slot]) if self.momentum is None else self.momentum
        if self.training and self.sync and x.is_cuda and dist.is_available() and dist.is_initialized():
            # synchronised statistics across DDP ranks, with torch's own SyncBatchNorm kernels (CUDA only)
            from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

            group = dist.group.WORLD
            return sync_batch_norm.apply(
                x, self.weight[:ch], self.bias[:ch], mean, var, self.eps, factor, group, dist.get_world_size(group)
            )
        return F.batch_norm(x, mean, var, self.weight[:ch], self.bias[:ch], self.training, factor, self.eps)

    def to_static(self, num_features: int, slot: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(num_features, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            bn.weight.copy_(self.weight[:num_features])
            bn.bias.copy_(self.bias[:num_features])
            bn.running_mean.copy_(self.running_mean[slot, :num_features])
            bn.running_var.copy_(self.running_var[slot, :num_features])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[slot])
        return bn.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, slots={self.num_slots}, eps={self.eps}, momentum={self.momentum}"


class SlicedLayerNorm(SliceableModule):
    """LayerNorm over the first ``x.shape[-1]`` features: gamma and beta are prefixes.

    LayerNorm normalises each token by its own statistics, so no private
    running state is needed.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: Tensor) -> Tensor:
        dim = x.shape[-1]
        if dim > self.normalized_shape:
            raise ValueError(f"SlicedLayerNorm holds {self.normalized_shape} features, got {dim}")
        return F.layer_norm(x, (dim,), self.weight[:dim], self.bias[:dim], self.eps)

    def to_static(self, dim: int) -> nn.LayerNorm:
        ln = nn.LayerNorm(dim, eps=self.eps)
        with torch.no_grad():
            ln.weight.copy_(self.weight[:dim])
            ln.bias.copy_(self.bias[:dim])
        return ln.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
