"""Sliceable layers: one dense weight, used as a prefix slice ``W[:k_out, :k_in]``.

The width of every call is passed explicitly through ``forward`` (output width
as an argument, input width read off the input tensor); nothing is stored on the
module between calls, so the same module can serve several widths in one batch
loop, in several threads, or under autograd without any global state.

Each layer can hand back its static equivalent (``to_static``): a plain
``torch.nn`` layer holding compact copies of the sliced weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CacheBudget",
    "TensorCache",
    "SliceableModule",
    "SlicedConv2d",
    "SlicedLinear",
    "SlicedBatchNorm2d",
    "SlicedLayerNorm",
    "autocast_dtype",
    "version_stamp",
    "stored_channels_last",
    "clear_caches",
    "conv_bn",
    "fold_batchnorm",
]


class SliceableModule(nn.Module):
    """Marker base class: a module whose weights are used as prefix slices.

    Loading a state dict drops the module's inference caches: inside ``torch.inference_mode()`` the copy into
    inference tensors moves no version counter the cache could see.
    """

    def own_tensors(self) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` (bias None when the layer has none), read from the module's own parameter table.

        The inference fast paths stamp these on every call; ``nn.Module.__getattr__`` (a Python function per
        attribute) costs more there than the rest of the cache lookup.
        """
        params = self._parameters
        return params["weight"], params.get("bias")

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # torch's per-module loading hook
        clear_caches(self)
        super()._load_from_state_dict(*args, **kwargs)


def clear_caches(module: nn.Module) -> None:
    """Drop the inference caches one module holds itself (its :class:`TensorCache` and ``_args`` entries)."""
    for value in vars(module).values():
        if isinstance(value, TensorCache):
            value.clear()
    args = getattr(module, "_args", None)
    if isinstance(args, dict):
        args.clear()


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs convolutions and matmuls in on ``x``'s device, or None when autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class CacheBudget:
    """What a model's inference caches may hold: on or off, and at most ``max_bytes`` (least recently used go first).

    One budget is shared by every :class:`TensorCache` of a model (see ``DynamicNet.set_inference_cache``). Only
    entries that own memory count (copies; views of a parameter are free). An entry larger than the whole budget is
    used for its call and not kept.
    """

    def __init__(self, enabled: bool = True, max_bytes: int | None = None) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative integer number of bytes or None, got {max_bytes!r}")
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.total = 0
        # keyed by the cache object itself (not its id), so a deep copy of a model keeps its accounting consistent
        self._lru: OrderedDict[tuple[TensorCache, object], int] = OrderedDict()

    @property
    def bounded(self) -> bool:
        return self.max_bytes is not None

    def touch(self, cache: TensorCache, key: object) -> None:
        if (cache, key) in self._lru:
            self._lru.move_to_end((cache, key))

    def admit(self, cache: TensorCache, key: object, nbytes: int) -> bool:
        """Account a new entry; evict the oldest until the total fits. False: the entry itself does not fit."""
        self.forget(cache, key)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False
        self._lru[(cache, key)] = nbytes
        self.total += nbytes
        while self.max_bytes is not None and self.total > self.max_bytes:
            (owner, old_key), size = self._lru.popitem(last=False)
            self.total -= size
            owner.evict(old_key)
        return True

    def forget(self, cache: TensorCache, key: object) -> None:
        size = self._lru.pop((cache, key), None)
        if size is not None:
            self.total -= size


def _version(t: Tensor) -> int:
    # inference tensors have no version counter: they are stamped by storage alone (loading a state dict
    # clears the caches, see SliceableModule; other in-place writes inside inference_mode need a clear)
    return 0 if t.is_inference() else t._version


def version_stamp(*tensors: Tensor | None) -> tuple:
    """What makes cached views/copies of these tensors stale: an in-place update or new storage.

    Read on every inference call of every sliced layer, so the common case (no inference tensors) is one list
    comprehension; a tensor made inside ``inference_mode`` has no version counter and takes the slower path.
    """
    try:
        return tuple([(t._version, t.data_ptr()) for t in tensors if t is not None])
    except RuntimeError:
        return tuple((_version(t), t.data_ptr()) for t in tensors if t is not None)


_stamp = version_stamp


def _contiguous_like(t: Tensor, source: Tensor) -> Tensor:
    """``t`` made dense in ``source``'s memory format: channels-last when both are 4-D and ``source`` is stored so.

    A convolution whose input is channels-last and whose weight is not reorders the weight on every call, so a
    cached copy of a channels-last weight (``model.to(memory_format=torch.channels_last)``) stays channels-last.
    """
    if t.dim() == 4 and (stored_channels_last(t) or stored_channels_last(source)):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def stored_channels_last(t: Tensor) -> bool:
    """Stored channels-last and not also plainly contiguous (a 1x1 kernel or a single channel is both)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _owned_bytes(value: object, sources: tuple[Tensor | None, ...]) -> int:
    """Bytes of the storages in ``value`` (a tensor or a tuple of them) that are not the sources' own."""
    own = {t.untyped_storage().data_ptr() for t in sources if t is not None}
    seen, total = set(), 0
    for t in value if isinstance(value, tuple) else (value,):
        if isinstance(t, Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own and ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


class TensorCache:
    """Contiguous tensors derived from parameters, for inference only.

    Slicing the *input* dimension of a weight (``W[:, :k_in]``) gives a strided
    view; convolution kernels copy such a view on every call. At inference we
    keep one contiguous copy per slice shape instead (also: BatchNorm-folded
    convolution weights, copies cast to the autocast dtype, and the ViT's
    resampled position embeddings). An entry is valid only for the exact
    storage and version counter of the tensors it was made from, so any
    in-place update (optimiser step, ``load_state_dict``, ``.to()``)
    invalidates it without anyone having to remember to clear it. While a
    gradient is being recorded for a source the cache is bypassed: training
    must differentiate through the slicing. A shared :class:`CacheBudget`
    (``budget``) can turn caching off or bound its memory; ``dependents`` are
    dicts that may hold references to entries and are cleared when one is evicted.
    """

    def __init__(self, dependents: tuple[dict, ...] = ()) -> None:
        self._entries: dict[object, tuple[tuple, object]] = {}
        self.budget: CacheBudget | None = None
        self.dependents = dependents

    @property
    def enabled(self) -> bool:
        return self.budget is None or self.budget.enabled

    @property
    def bounded(self) -> bool:
        return self.budget is not None and self.budget.bounded

    def get(self, param: Tensor, key: object, make: Callable[[], Tensor]) -> Tensor:
        return self.get_derived((param,), key, make)  # type: ignore[return-value]

    def get_derived(self, sources: tuple[Tensor | None, ...], key: object, make: Callable[[], object]) -> object:
        """The cached ``make()`` (a tensor or a tuple of tensors) for ``key``, valid while ``sources`` are unchanged."""
        if torch.compiler.is_compiling() or not self.enabled:
            return make()  # export/compile trace it
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
            return make()  # training differentiates through it
        first = sources[0]
        stamp = (_stamp(*sources), first.dtype, first.device)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            if self.budget is not None and self.budget.bounded:
                self.budget.touch(self, key)
            return entry[1]
        with torch.inference_mode(False), torch.no_grad():
            value = make()
            if isinstance(value, tuple):
                value = tuple(_contiguous_like(v, first) for v in value)
            else:
                value = _contiguous_like(value, first)
        if self.budget is not None and not self.budget.admit(self, key, _owned_bytes(value, sources)):
            self._entries.pop(key, None)
            return value
        self._entries[key] = (stamp, value)
        return value

    def evict(self, key: object) -> None:
        self._entries.pop(key, None)
        if self.budget is not None:
            self.budget.forget(self, key)
        for d in self.dependents:
            d.clear()

    def clear(self) -> None:
        if self.budget is not None:
            for key in self._entries:
                self.budget.forget(self, key)
        self._entries.clear()

    def nbytes(self, exclude: set[int] | None = None) -> dict[int, int]:
        """Storages the entries hold (data pointer -> bytes), leaving out those in ``exclude`` (e.g. parameters')."""
        out: dict[int, int] = {}
        for _, value in self._entries.values():
            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if exclude is None or ptr not in exclude:
                        out[ptr] = t.untyped_storage().nbytes()
        return out

    def __len__(self) -> int:
        return len(self._entries)


def _slice_rows_cols(
    param: Tensor, rows: int, cols: int | None, cache: TensorCache, cast: torch.dtype | None = None
) -> Tensor:
    """``param[:rows, :cols]``, contiguous and cached when no gradient is being recorded.

    ``cast``: the dtype autocast would cast the slice to on every call; the cast copy is cached instead.
    """
    full_rows = rows == param.shape[0]
    full_cols = cols is None or cols == param.shape[1]
    if cast is not None and cast != param.dtype:
        return cache.get(param, (rows, cols, cast), lambda: param[:rows, :cols].to(cast))
    if full_rows and full_cols:
        return param
    view = param[:rows] if full_cols else param[:rows, :cols]
    if view.is_contiguous() or stored_channels_last(view) or torch.is_grad_enabled():
        return view  # a row prefix of a channels-last weight is itself dense channels-last
    return cache.get(param, (rows, cols), lambda: param[:rows, :cols])


def _cast_prefix(param: Tensor | None, rows: int, cache: TensorCache, cast: torch.dtype | None) -> Tensor | None:
    if param is None:
        return None
    if cast is None or cast == param.dtype:
        return param[:rows]
    return cache.get(param, ("prefix", rows, cast), lambda: param[:rows].to(cast))


def _inference_call() -> bool:
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class SlicedConv2d(SliceableModule):
    """2-D convolution (dense, pointwise or depthwise) over a prefix of its channels.

    ``forward(x, out_channels)`` uses the first ``x.shape[1]`` input channels and
    the first ``out_channels`` filters. A depthwise convolution has as many
    outputs as inputs, so it takes no ``out_channels``. :meth:`forward_bn` (or
    :func:`conv_bn`) runs the convolution and the BatchNorm that follows it,
    folded into one convolution at inference.
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
        self._args: dict[tuple, tuple] = {}
        self._cache = TensorCache(dependents=(self._args,))

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
        if _inference_call() and self._cache.enabled:
            # inference fast path: the sliced (weight, bias, groups) of this width pair are built
            # once, so a call costs one dict lookup instead of validation plus 2-4 slicing ops
            cast = autocast_dtype(x)
            if self._cache.bounded:  # every call goes through the (LRU) cache
                weight, bias, groups = self._conv_args(x, out_channels, cast)
                return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)
            key = (x.shape[1], out_channels, cast)
            stamp = _stamp(*self.own_tensors())
            hit = self._args.get(key)
            if hit is None or hit[0] != stamp:
                hit = (stamp, self._conv_args(x, out_channels, cast))
                self._args[key] = hit
            weight, bias, groups = hit[1]
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)
        weight, bias, groups = self._conv_args(x, out_channels)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _conv_args(
        self, x: Tensor, out_channels: int | None, cast: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor | None, int]:
        in_ch, out_ch = self._widths(x, out_channels)
        cols = None if self.depthwise else in_ch
        weight = _slice_rows_cols(self.weight, out_ch, cols, self._cache, cast)
        bias = _cast_prefix(self.bias, out_ch, self._cache, cast)
        return weight, bias, in_ch if self.depthwise else 1

    def forward_bn(self, x: Tensor, bn: SlicedBatchNorm2d, slot: int, out_channels: int | None = None) -> Tensor:
        """``bn(self(x, out_channels), slot)``; at inference one convolution with ``bn`` folded into it.

        Folding applies in eval mode with no gradient recorded (``torch.no_grad``/``inference_mode``): the
        folded weight and bias of each (input width, output width, statistics slot, autocast dtype) are computed
        once (in float64 where the device has it) and cached like the weight slices, so they follow optimiser
        steps, ``load_state_dict`` and ``.to()``. Training, gradient-recording calls, compiled/exported traces,
        a disabled cache, ``torch.fx`` symbolic tracing, and modules with forward hooks or a replaced forward
        (which must see both calls) run the two layers as is.
        """
        hot_key = ("bn", bn, x.shape[1], out_channels, slot)  # the hot path's entry in ``_args``
        if not bn.training and _inference_call() and not isinstance(x, fx.Proxy):
            # the hot path of folded inference: one lookup and one stamp (what ``get_derived`` checks) per call
            hit = self._args.get(hot_key)
            if (
                hit is not None
                and hit[0] == _stamp(*self.own_tensors(), *bn.fold_sources())
                and self._plain_inference(bn, hit[4])
            ):
                return F.conv2d(x, hit[1], hit[2], self.stride, self.padding, self.dilation, hit[3])
        if (
            bn.training
            or not _inference_call()
            or not self._cache.enabled
            or isinstance(x, fx.Proxy)  # symbolic tracing records the two module calls
            or _hooked(self, SlicedConv2d)
            or _hooked(bn, SlicedBatchNorm2d)
        ):
            return bn(self(x, out_channels), slot)
        cast = autocast_dtype(x)
        if cast == self.weight.dtype:
            cast = None
        key = ("bn", x.shape[1], out_channels, slot, cast)
        sources = (*self.own_tensors(), *bn.fold_sources())
        weight, bias = self._cache.get_derived(sources, key, lambda: self._folded(x, out_channels, bn, slot, cast))
        groups = x.shape[1] if self.depthwise else 1
        if cast is None and not self._cache.bounded and not torch.is_autocast_enabled(x.device.type):
            self._args[hot_key] = (
                _stamp(*sources),
                weight,
                bias,
                groups,
                x.device.type,
            )
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _plain_inference(self, bn: SlicedBatchNorm2d, device_type: str) -> bool:
        """Whether a folded inference call (not traced: the caller checked) may skip the checks of
        :meth:`forward_bn`: nothing casts or watches it, and the cache is on and unbounded (a bounded one must
        see every call, to keep its LRU order)."""
        return (
            self._cache.enabled
            and not self._cache.bounded
            and not torch.is_autocast_enabled(device_type)
            and not _hooked(self, SlicedConv2d)
            and not _hooked(bn, SlicedBatchNorm2d)
        )

    def _folded(
        self, x: Tensor, out_channels: int | None, bn: SlicedBatchNorm2d, slot: int, cast: torch.dtype | None
    ) -> tuple[Tensor, Tensor]:
        in_ch, out_ch = self._widths(x, out_channels)
        check_bn_slot(bn, out_ch, slot)
        return self.fold_into(self.weight[:out_ch, : 1 if self.depthwise else in_ch], bn, slot, cast)

    def fold_into(
        self, weight: Tensor, bn: SlicedBatchNorm2d, slot: int, cast: torch.dtype | None
    ) -> tuple[Tensor, Tensor]:
        """``weight`` (this conv's active weight, ``weight.shape[0]`` output channels) with statistics slot
        ``slot`` of ``bn`` folded in, cast to ``cast`` (None: the weights' dtype); the bias includes this conv's."""
        out_ch = weight.shape[0]
        folded, bias = fold_batchnorm(
            weight,
            None if self.bias is None else self.bias[:out_ch],
            bn.running_mean[slot, :out_ch],
            bn.running_var[slot, :out_ch],
            bn.weight[:out_ch],
            bn.bias[:out_ch],
            bn.eps,
        )
        dtype = cast or self.weight.dtype
        return folded.to(dtype), bias.to(dtype)

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
        self._args: dict[tuple, tuple] = {}
        self._cache = TensorCache(dependents=(self._args,))

    def forward(self, x: Tensor, out_features: int | None = None) -> Tensor:
        if _inference_call() and self._cache.enabled:  # inference fast path, as SlicedConv2d's
            cast = autocast_dtype(x)
            if self._cache.bounded:
                return F.linear(x, *self._linear_args(x, out_features, cast))
            key = (x.shape[-1], out_features, cast)
            stamp = _stamp(*self.own_tensors())
            hit = self._args.get(key)
            if hit is None or hit[0] != stamp:
                hit = (stamp, self._linear_args(x, out_features, cast))
                self._args[key] = hit
            return F.linear(x, *hit[1])
        return F.linear(x, *self._linear_args(x, out_features))

    def _linear_args(
        self, x: Tensor, out_features: int | None, cast: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor | None]:
        in_f = x.shape[-1]
        if in_f > self.in_features:
            raise ValueError(f"SlicedLinear holds {self.in_features} input features, got {in_f}")
        out_f = self.out_features if out_features is None else out_features
        if not 0 < out_f <= self.out_features:
            raise ValueError(f"SlicedLinear holds {self.out_features} output features, asked for {out_f}")
        weight = _slice_rows_cols(self.weight, out_f, in_f, self._cache, cast)
        bias = _cast_prefix(self.bias, out_f, self._cache, cast)
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


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of the default process group, differentiable: the backward sums the gradients too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # noqa: ARG004
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: ARG004
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _sync_batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
) -> Tensor:
    """Training-mode BatchNorm with batch statistics over every rank of the default process group.

    What ``nn.SyncBatchNorm`` computes, with public torch only: the per-channel sum and count all-reduced, then
    the sum of squared deviations from that mean (two passes: no ``E[x^2] - E[x]^2`` cancellation), through
    :class:`_AllReduceSum`, whose backward all-reduces the gradients, so every rank's input gets the gradient
    of the loss summed over ranks, as with ``nn.SyncBatchNorm``. The running
    statistics (a prefix of one slot's, updated in place) get the global mean and the unbiased global
    variance. Works with any backend (gloo on CPU, NCCL on GPU).
    """
    all_reduce = _AllReduceSum.apply
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
    total = all_reduce(torch.cat([x.sum(dims), count]))
    n = total[-1]
    mean = total[:-1] / n
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / n
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=momentum)
    return centred * torch.rsqrt(var + eps).view(shape) * weight.view(shape) + bias.view(shape)


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
        self.sync = False  # statistics over all DDP ranks (set by stage I on multi-GPU runs)
        self._args: dict[tuple, tuple] = {}

    def fold_sources(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(weight, bias, running_mean, running_var)``: what a folded or cached inference copy depends on."""
        params, buffers = self._parameters, self._buffers
        return params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"]

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, slot: int) -> Tensor:
        if not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference fast path: the four (slot, width) views are built once, not per call
            key = (slot, x.shape[1])
            stamp = _stamp(*self.fold_sources())
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
        if self.training and self.sync and dist.is_available() and dist.is_initialized():
            # statistics over every DDP rank (stage I sets `sync` on multi-GPU runs)
            return _sync_batch_norm(x, self.weight[:ch], self.bias[:ch], mean, var, self.eps, factor)
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


def _hooked(module: nn.Module, cls: type) -> bool:
    """Whether something watches or replaces ``module``'s forward (then folding, which skips it, must not apply).

    Forward hooks, a forward patched onto the instance, or a subclass overriding ``cls.forward``.
    """
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in vars(module)
        or type(module).forward is not cls.forward
    )


def check_bn_slot(bn: SlicedBatchNorm2d, out_channels: int, slot: int) -> None:
    """Raise if ``bn`` cannot normalise ``out_channels`` channels from its statistics slot ``slot``."""
    if out_channels > bn.num_features:
        raise ValueError(f"SlicedBatchNorm2d holds {bn.num_features} channels, got {out_channels}")
    if not 0 <= slot < bn.num_slots:
        raise IndexError(f"SlicedBatchNorm2d has {bn.num_slots} statistics slots, asked for slot {slot}")


def fold_batchnorm(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution equal to ``conv(weight, bias)`` followed by an eval-mode BatchNorm.

    ``weight * s`` and ``(bias - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel,
    computed in float64 where the device has it, returned in ``weight``'s dtype (new tensors, no autograd history).
    """
    acc = torch.float64 if weight.device.type in ("cpu", "cuda") else weight.dtype
    with torch.no_grad():
        scale = torch.rsqrt(running_var.to(acc) + eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(acc)
        shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
        shift = shift * scale
        if bn_bias is not None:
            shift = shift + bn_bias.to(acc)
        folded = weight.to(acc) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        return folded.to(weight.dtype), shift.to(weight.dtype)


def conv_bn(conv: SlicedConv2d, bn: SlicedBatchNorm2d, x: Tensor, slot: int, out_channels: int | None = None) -> Tensor:
    """``bn(conv(x, out_channels), slot)``, folded into one cached convolution at inference.

    See :meth:`SlicedConv2d.forward_bn`; in training mode (or while gradients are recorded) it is exactly the two
    calls: batch statistics, running-statistics updates and gradients as unfused.
    """
    return conv.forward_bn(x, bn, slot, out_channels)
