"""Kernel-size slicing: a convolution whose active kernel is a centre crop of its largest (DS-Net++ [paper]).

:class:`KernelSlicedConv2d` stores one ``K x K`` kernel (``K`` the largest of
``kernel_sizes``) and, called with ``kernel_size=k``, convolves with the centre
``k x k`` crop of it, padded by ``(k - 1) // 2 * dilation`` so the output has
the shape every other choice gives (odd kernels only). Channels slice as in
:class:`~dsnet.layers.sliced.SlicedConv2d` (a prefix of filters and inputs);
the kernel crop is one more slice of the same dense weight, so a small kernel
is an ordinary dense convolution at inference.

``transform=True`` adds once-for-all's **kernel transformation matrices**
(Cai et al., ICLR 2020) as an option, off by default: per layer and per step
down the kernel list (7 -> 5, 5 -> 3) one learned ``k^2 x k^2`` matrix, shared
by every channel and initialised to the identity, maps the centre crop of the
next larger (already transformed) kernel to the smaller kernel:
``W_5 = T_75(crop_5(W_7))``, ``W_3 = T_53(crop_3(W_5))``. The largest kernel
is the stored weight as is. The matrices are weights, not per-sample compute:
the map is an elementwise product and a sum (not a matmul), which
``torch.utils.flop_counter`` does not count, so a sub-network's MACs are its
convolutions' (what the extracted network computes; the matrices are baked
into its ``nn.Conv2d``).

The full kernel (``kernel_size=None`` or the largest) runs exactly the
:class:`SlicedConv2d` code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, autocast_dtype, check_bn_slot

__all__ = ["KernelSlicedConv2d", "kernel_conv_bn", "check_kernel_sizes"]


def check_kernel_sizes(kernel_sizes: Sequence[int]) -> tuple[int, ...]:
    """``kernel_sizes`` as a sorted tuple of distinct odd positive ints (``ValueError`` otherwise)."""
    sizes = [int(k) for k in kernel_sizes]
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"kernel sizes must be distinct odd positive integers, got {list(kernel_sizes)}")
    return tuple(sorted(sizes))


def _inference_call() -> bool:
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _watched(module: nn.Module, cls: type) -> bool:
    """Forward hooks, an instance-level forward, or a subclass overriding ``cls.forward`` (then no folding)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in vars(module)
        or type(module).forward is not cls.forward
    )


class KernelSlicedConv2d(SlicedConv2d):
    """A :class:`SlicedConv2d` (dense or depthwise) whose kernel size is chosen per call among ``kernel_sizes``.

    ``forward(x, out_channels=None, kernel_size=None)``: the first
    ``x.shape[1]`` input channels, the first ``out_channels`` filters, the
    centre ``kernel_size`` crop (default: the largest kernel). Padding is
    always "same" for stride 1 (``(k - 1) // 2 * dilation``), so every kernel
    choice gives the same output shape. See the module docstring for
    ``transform``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int],
        stride: int = 1,
        dilation: int = 1,
        depthwise: bool = False,
        bias: bool = False,
        transform: bool = False,
    ) -> None:
        sizes = check_kernel_sizes(kernel_sizes)
        super().__init__(in_channels, out_channels, sizes[-1], stride, None, dilation, depthwise, bias)
        self.kernel_sizes = sizes
        self.transform = bool(transform)
        if self.transform:
            for big, small in zip(sizes[::-1], sizes[-2::-1]):
                self.register_parameter(self._matrix_name(big, small), nn.Parameter(torch.eye(small * small)))

    # ------------------------------------------------------------- kernels
    @staticmethod
    def _matrix_name(big: int, small: int) -> str:
        return f"transform_{big}to{small}"

    def transform_matrices(self) -> list[Tensor]:
        """The kernel transformation matrices, largest step first (empty without ``transform``)."""
        sizes = self.kernel_sizes
        if not self.transform:
            return []
        return [getattr(self, self._matrix_name(b, s)) for b, s in zip(sizes[::-1], sizes[-2::-1])]

    def check_kernel(self, kernel_size: int | None) -> int:
        """The kernel size a call uses: ``kernel_size``, or the largest when None."""
        if kernel_size is None:
            return self.kernel_size
        if isinstance(kernel_size, bool) or int(kernel_size) not in self.kernel_sizes:
            raise ValueError(
                f"{type(self).__name__} has kernel sizes {list(self.kernel_sizes)}, asked for {kernel_size!r}"
            )
        return int(kernel_size)

    def padding_for(self, kernel_size: int) -> int:
        """The padding of the ``kernel_size`` crop: the output shape of the largest kernel, for every choice."""
        return self.padding - (self.kernel_size - kernel_size) // 2 * self.dilation

    def kernel_weight(self, kernel_size: int, out_channels: int, in_channels: int) -> Tensor:
        """The ``(out, in per group, k, k)`` weight of one call: channel prefix, centre crop, transformation."""
        w = self.weight[:out_channels, : 1 if self.depthwise else in_channels]
        size = self.kernel_size
        if not self.transform:
            off = (size - kernel_size) // 2
            return w[:, :, off : off + kernel_size, off : off + kernel_size]
        for small in reversed([k for k in self.kernel_sizes if kernel_size <= k < self.kernel_size]):
            off = (size - small) // 2
            crop = w[:, :, off : off + small, off : off + small].reshape(*w.shape[:2], 1, small * small)
            matrix = getattr(self, self._matrix_name(size, small))
            # y_p = sum_q T[p, q] x_q per filter, written as a product and a sum: a weight transform, not a matmul
            # the MAC counter would charge to every sample
            w = (crop * matrix).sum(-1).reshape(*w.shape[:2], small, small)
            size = small
        return w

    def _sources(self) -> tuple[Tensor | None, ...]:
        return (self.weight, self.bias, *self.transform_matrices())

    def _call_weight(
        self, in_ch: int, out_ch: int, kernel_size: int, cast: torch.dtype | None
    ) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of a cropped call; contiguous and cached at inference (per widths, kernel, dtype)."""
        bias = None if self.bias is None else self.bias[:out_ch]
        if cast is not None and bias is not None:
            bias = bias.to(cast)

        def make() -> Tensor:
            w = self.kernel_weight(kernel_size, out_ch, in_ch)
            return w if cast is None else w.to(cast)

        if not _inference_call():
            return make(), bias
        weight = self._cache.get_derived(self._sources(), ("kernel", in_ch, out_ch, kernel_size, cast), make)
        return weight, bias  # type: ignore[return-value]

    # ------------------------------------------------------------- forward
    def forward(self, x: Tensor, out_channels: int | None = None, kernel_size: int | None = None) -> Tensor:
        k = self.check_kernel(kernel_size)
        if k == self.kernel_size:
            return super().forward(x, out_channels)
        in_ch, out_ch = self._widths(x, out_channels)
        weight, bias = self._call_weight(in_ch, out_ch, k, autocast_dtype(x))
        groups = in_ch if self.depthwise else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding_for(k), self.dilation, groups)

    def forward_bn(
        self,
        x: Tensor,
        bn: SlicedBatchNorm2d,
        slot: int,
        out_channels: int | None = None,
        kernel_size: int | None = None,
    ) -> Tensor:
        """``bn(self(x, out_channels, kernel_size), slot)``; folded into one cached convolution at inference.

        As :meth:`SlicedConv2d.forward_bn` (the same conditions for folding), with the kernel crop.
        """
        k = self.check_kernel(kernel_size)
        if (
            bn.training
            or not _inference_call()
            or not self._cache.enabled
            or isinstance(x, fx.Proxy)
            or _watched(self, KernelSlicedConv2d)
            or _watched(bn, SlicedBatchNorm2d)
        ):
            return bn(self(x, out_channels, k), slot)
        cast = autocast_dtype(x)
        if cast == self.weight.dtype:
            cast = None
        in_ch, out_ch = self._widths(x, out_channels)
        check_bn_slot(bn, out_ch, slot)

        def make() -> tuple[Tensor, Tensor]:
            return self.fold_into(self.kernel_weight(k, out_ch, in_ch), bn, slot, cast)

        sources = (*self._sources(), bn.weight, bn.bias, bn.running_mean, bn.running_var)
        weight, bias = self._cache.get_derived(sources, ("bn-kernel", in_ch, out_ch, k, slot, cast), make)
        groups = in_ch if self.depthwise else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding_for(k), self.dilation, groups)

    def to_static(  # type: ignore[override]
        self, in_channels: int, out_channels: int | None = None, kernel_size: int | None = None
    ) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` of the cropped (and transformed) ``kernel_size``, padded to the same output shape."""
        k = self.check_kernel(kernel_size)
        out_channels = in_channels if self.depthwise else (out_channels or self.out_channels)
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            k,
            self.stride,
            self.padding_for(k),
            self.dilation,
            groups=in_channels if self.depthwise else 1,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.kernel_weight(k, out_channels, in_channels))
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_channels])
        return conv.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        kind = "depthwise, " if self.depthwise else ""
        extra = ", transform=True" if self.transform else ""
        return (
            f"{self.in_channels}, {self.out_channels}, {kind}kernel_sizes={list(self.kernel_sizes)}, "
            f"stride={self.stride}, bias={self.bias is not None}{extra}"
        )


def kernel_conv_bn(
    conv: KernelSlicedConv2d,
    bn: SlicedBatchNorm2d,
    x: Tensor,
    slot: int,
    out_channels: int | None = None,
    kernel_size: int | None = None,
) -> Tensor:
    """``bn(conv(x, out_channels, kernel_size), slot)``, folded into one cached convolution at inference."""
    return conv.forward_bn(x, bn, slot, out_channels, kernel_size)
