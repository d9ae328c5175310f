"""Per-sample channel subsets: the "arbitrary sparsity" of channel-skipping networks (LC-Net, FBS).

A channel-skipping network picks, per input, *which* ``k`` of a layer's ``C``
channels to compute. Unlike DS-Net's prefix slices (``W[:k]``, one dense slice
shared by the whole batch), every sample may pick a different set, so the
computation cannot be one dense convolution over the batch. This module
computes it the most direct way a dense library allows:

* **gather**: per sample, gather the kept filter rows (output subset) and/or
  kernel columns (input subset) of the weight, and run all samples at once as
  one *grouped* convolution with one group per sample (the batch folded into
  the channel dimension). At batch 1 that is an ordinary dense convolution of
  ``k`` channels with freshly gathered weights. BatchNorm (eval) is applied
  with the kept channels' statistics gathered the same way. Only the kept
  channels' multiply-adds are computed.

and offers the two references a benchmark needs at the same channel count:

* **prefix**: the first ``k`` channels (``W[:k]``), one dense convolution for
  the whole batch, weight slices cached contiguously (what DS-Net computes);
* full width (``forward``), which a **zero-masking** network computes before
  multiplying the dropped channels by zero.

Only the channel *selection* is a tensor argument; nothing is stored on the
module between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.sliced import TensorCache

__all__ = ["ChannelSubsetConvBN", "subset_conv2d", "topk_channels"]


def topk_channels(saliency: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most salient channels of each sample, in ascending channel order, and their saliencies.

    Returns ``(index, value)``, both ``(N, k)``. Ascending order keeps gathered
    weight rows in memory order; the order of kept channels does not change the
    result as long as every layer of a block uses the same ``index``.
    """
    if not 0 < k <= saliency.shape[1]:
        raise ValueError(f"cannot keep {k} of {saliency.shape[1]} channels")
    index = saliency.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return index, saliency.gather(1, index)


def subset_conv2d(
    x: Tensor,
    weight: Tensor,
    out_index: Tensor | None,
    in_index: Tensor | None,
    stride: int,
    padding: int,
) -> Tensor:
    """Convolution of each sample with its own subset of filters and/or input channels.

    ``x`` is ``(N, C_in', H, W)``: ``C_in' = in_index.shape[1]`` when the input
    is itself a channel subset (the channels ``in_index[n]`` of the full
    input), else the full input width. ``out_index`` ``(N, k_out)`` picks the
    filters to compute (all when None). Returns ``(N, k_out or C_out, H', W')``.
    """
    n = x.shape[0]
    c_out = weight.shape[0]
    if out_index is None and in_index is None:
        return F.conv2d(x, weight, None, stride, padding)
    if out_index is not None and in_index is not None:
        w = weight[out_index[:, :, None], in_index[:, None, :]]  # (N, k_out, k_in, kh, kw)
    elif out_index is not None:
        w = weight[out_index]  # (N, k_out, C_in, kh, kw)
    else:
        rows = torch.arange(c_out, device=weight.device)
        w = weight[rows[None, :, None], in_index[:, None, :]]  # (N, C_out, k_in, kh, kw)
    if n == 1:
        return F.conv2d(x, w[0], None, stride, padding)
    k_out, k_in = w.shape[1], w.shape[2]
    if x.shape[1] != k_in:
        raise ValueError(f"input has {x.shape[1]} channels, the input subset has {k_in}")
    y = F.conv2d(
        x.reshape(1, n * k_in, *x.shape[2:]), w.reshape(n * k_out, k_in, *w.shape[3:]), None, stride, padding, 1, n
    )
    return y.view(n, k_out, *y.shape[2:])


class ChannelSubsetConvBN(nn.Module):
    """Convolution (no bias) + BatchNorm whose channels can be computed as a per-sample subset or a prefix.

    * ``forward(x)``: the dense layer (training; full width; zero-masking).
    * ``gather(x, out_index, in_index)``: per-sample subsets (eval only), see :func:`subset_conv2d`.
    * ``prefix(x, out_channels)``: the first ``out_channels`` filters over the
      first ``x.shape[1]`` input channels (eval only), contiguous slices cached.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, self.padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self._cache = TensorCache()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def _check_eval(self, what: str) -> None:
        if self.bn.training:
            raise RuntimeError(f"{what} computes with the BatchNorm running statistics: call model.eval() first")

    def gather(self, x: Tensor, out_index: Tensor | None = None, in_index: Tensor | None = None) -> Tensor:
        """Per-sample channel subsets; output ``(N, k_out, H', W')`` (``C_out`` when ``out_index`` is None)."""
        self._check_eval("gather()")
        y = subset_conv2d(x, self.conv.weight, out_index, in_index, self.stride, self.padding)
        bn = self.bn
        if out_index is None:
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        n, k = out_index.shape
        flat = out_index.reshape(-1)  # the (N*k) channels of the batch-folded layout, each with its own statistics
        z = F.batch_norm(
            y.reshape(1, n * k, *y.shape[2:]),
            bn.running_mean[flat],
            bn.running_var[flat],
            bn.weight[flat],
            bn.bias[flat],
            False,
            0.0,
            bn.eps,
        )
        return z.view_as(y)

    def prefix(self, x: Tensor, out_channels: int) -> Tensor:
        """The first ``out_channels`` filters over the first ``x.shape[1]`` input channels (dense, batched)."""
        self._check_eval("prefix()")
        c_in = x.shape[1]
        weight = self.conv.weight
        if c_in == self.in_channels and out_channels == self.out_channels:
            w = weight
        else:
            w = self._cache.get(weight, (out_channels, c_in), lambda: weight[:out_channels, :c_in])
        y = F.conv2d(x, w, None, self.stride, self.padding)
        bn = self.bn
        k = out_channels
        return F.batch_norm(y, bn.running_mean[:k], bn.running_var[:k], bn.weight[:k], bn.bias[:k], False, 0.0, bn.eps)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"
