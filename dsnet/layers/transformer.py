"""Sliceable vision-transformer parts: per-head attention, MLP, blocks, token embedding, token gate.

Widths follow the rest of dsnet: one dense weight per layer, used as a prefix
slice chosen per call, and a ``to_static`` that hands back plain ``torch.nn``
layers holding compact copies.

* **Attention** slices by whole heads; the head dimension is fixed. The fused
  ``qkv`` weight keeps the timm/DeiT layout, rows ``[q heads | k heads | v
  heads]``, so ``h`` heads take three row blocks (the first ``h * head_dim``
  rows of each of q, k and v), not one prefix. The output projection uses the
  first ``h * head_dim`` columns. Attention itself runs in
  ``F.scaled_dot_product_attention``.
* **MLP** slices its hidden width (and its input/output embedding width).
* **Blocks** take the three dimensions separately: embedding width, heads and
  MLP hidden units (by default the last two follow the first, DeiT-style).
  They compute on the first ``width`` embedding dimensions of the token
  stream. With *dynamic idle slicing* (DS-Net++) the block adds its result to
  those dims and carries the rest through untouched, so a slim block keeps the
  full residual stream; with plain slicing the stream itself is cut (or
  zero-padded) to ``width``. The same helper, :func:`residual_at_width`, wires
  the sliced and the extracted blocks, so the two cannot drift apart.
* **TokenGate** is the double-headed DS-Net gate for ``(N, L, D)`` tokens:
  it pools patch tokens (or reads the class token), normalises the pooled
  features with per-slot BatchNorm statistics, and its attention head rescales
  the embedding channels of every token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.gate import DynamicGate
from dsnet.layers.sliced import (
    SliceableModule,
    SlicedBatchNorm2d,
    SlicedConv2d,
    SlicedLayerNorm,
    SlicedLinear,
    TensorCache,
)

__all__ = [
    "SlicedQKV",
    "SlicedAttention",
    "SlicedMlp",
    "DSViTBlock",
    "TokenGate",
    "StaticAttention",
    "StaticViTBlock",
    "StaticTokenEmbed",
    "StaticTokenGate",
    "StaticViTHead",
    "residual_at_width",
    "resample_pos_embed",
    "pool_tokens",
    "patch_embed_conv",
    "check_pool",
    "normalized_pool",
    "TensorCache",
]


def residual_at_width(x: Tensor, width: int, idle: bool, body: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a residual ``body`` to the first ``width`` embedding dims of the token stream ``x``.

    ``idle=True`` (dynamic idle slicing): dims ``width:`` are carried through
    unchanged, so the stream keeps its width. ``idle=False`` (plain slicing):
    the stream becomes ``width`` wide, cut if it was wider, zero-padded if it
    was narrower (zeros are what a prefix-sliced weight reads for features
    that do not exist, so padding is the weight-sharing reading of widening).
    ``body`` returns the updated ``width``-wide stream (it does its own adds).
    """
    dim = x.shape[-1]
    if idle:
        if width >= dim:
            if width > dim:
                raise ValueError(f"idle slicing cannot widen the stream: block width {width} > stream width {dim}")
            return body(x)
        return torch.cat([body(x[..., :width]), x[..., width:]], dim=-1)
    if width < dim:
        x = x[..., :width]
    elif width > dim:
        x = F.pad(x, (0, width - dim))
    return body(x)


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], old_grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Bicubic resampling of the patch part of a ``(1, prefix + H*W, D)`` position embedding.

    As timm's dynamic image size (``resample_abs_pos_embed``: bicubic,
    antialiased when shrinking), so a 224-px model accepts other resolutions.
    Each channel is resampled on its own, so resampling commutes with slicing
    the embedding dims: a compact static copy resamples to the same values.
    """
    if tuple(grid) == tuple(old_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", antialias=True, align_corners=False)
    patches = patches.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([prefix, patches], dim=1)


def pool_tokens(x: Tensor, pool: str, num_prefix: int) -> Tensor:
    """``(N, L, D) -> (N, D)``: the class token (``"token"``) or the mean of the patch tokens (``"avg"``)."""
    if pool == "token":
        return x[:, 0]
    return x[:, num_prefix:].mean(dim=1)


def normalized_pool(h: Tensor, pool: str, num_prefix: int, bn: Callable[[Tensor], Tensor] | nn.Module | None) -> Tensor:
    """The gate's input: pooled tokens, BatchNorm-ed per channel first when ``bn`` is given.

    The statistics are taken over every token that is pooled (all patch
    tokens for ``"avg"``), not over the pooled vectors: the result is the same
    per-channel affine map of the mean, but a training batch of one image still
    has many values per channel, so it does not fail as a BN over one pooled
    vector per image would.
    """
    if bn is None:
        return pool_tokens(h, pool, num_prefix)
    tokens = h[:, :1] if pool == "token" else h[:, num_prefix:]
    return bn(tokens.transpose(1, 2).unsqueeze(-1)).mean((2, 3))  # (N, T, C) -> (N, C, T, 1) -> (N, C)


def check_pool(pool: str, num_prefix: int) -> None:
    if pool not in ("token", "avg"):
        raise ValueError(f"pooling must be 'token' or 'avg', got {pool!r}")
    if pool == "token" and num_prefix == 0:
        raise ValueError("'token' pooling needs a class token")


# --------------------------------------------------------------------------- sliced layers
class SlicedQKV(SliceableModule):
    """The fused q/k/v projection, sliced by heads.

    ``weight`` is ``(3 * dim, in_features)`` in the timm layout (all q heads,
    then all k heads, then all v heads), so pretrained DeiT/timm weights load
    as they are. ``forward(x, heads)`` returns ``(..., 3 * heads * head_dim)``
    in the same q|k|v order, using rows ``[:heads * head_dim]`` of each block.
    """

    def __init__(self, in_features: int, num_heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dim = num_heads * head_dim
        ref = nn.Linear(in_features, 3 * self.dim, bias=bias)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self._cache = TensorCache()

    def _check(self, in_f: int, heads: int) -> None:
        if in_f > self.in_features:
            raise ValueError(f"SlicedQKV holds {self.in_features} input features, got {in_f}")
        if isinstance(heads, bool) or not 0 < heads <= self.num_heads:
            raise ValueError(f"SlicedQKV holds {self.num_heads} heads, asked for {heads}")

    def _compact_weight(self, heads: int, in_features: int) -> Tensor:
        """Rows ``[:heads * head_dim]`` of each of the q, k, v blocks, columns ``[:in_features]``."""
        rows = heads * self.head_dim
        return self.weight.view(3, self.dim, self.in_features)[:, :rows, :in_features].reshape(-1, in_features)

    def _compact_bias(self, heads: int) -> Tensor:
        return self.bias.view(3, self.dim)[:, : heads * self.head_dim].reshape(-1)

    def sliced_weight(self, heads: int, in_features: int) -> Tensor:
        """The ``(3 * heads * head_dim, in_features)`` weight; a cached contiguous copy at inference."""
        if heads == self.num_heads and in_features == self.in_features:
            return self.weight
        return self._cache.get(self.weight, ("w", heads, in_features), lambda: self._compact_weight(heads, in_features))

    def sliced_bias(self, heads: int) -> Tensor | None:
        if self.bias is None or heads == self.num_heads:
            return self.bias
        return self._cache.get(self.bias, ("b", heads), lambda: self._compact_bias(heads))

    def forward(self, x: Tensor, heads: int | None = None) -> Tensor:
        heads = self.num_heads if heads is None else heads
        self._check(x.shape[-1], heads)
        return F.linear(x, self.sliced_weight(heads, x.shape[-1]), self.sliced_bias(heads))

    def to_static(self, in_features: int, heads: int) -> nn.Linear:
        self._check(in_features, heads)
        lin = nn.Linear(in_features, 3 * heads * self.head_dim, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self._compact_weight(heads, in_features))
            if self.bias is not None:
                lin.bias.copy_(self._compact_bias(heads))
        return lin.to(self.weight.device, self.weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"bias={self.bias is not None}"
        )


def _attention(qkv: Tensor, heads: int, head_dim: int) -> Tensor:
    """``(N, L, 3*h*hd)`` fused q|k|v -> ``(N, L, h*hd)`` multi-head attention output (before projection)."""
    n, length, _ = qkv.shape
    q, k, v = qkv.view(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as timm
    return out.transpose(1, 2).reshape(n, length, heads * head_dim)


class SlicedAttention(SliceableModule):
    """Multi-head self-attention over the first ``heads`` heads (timm parameter names ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = SlicedQKV(dim, num_heads, head_dim, qkv_bias)
        self.proj = SlicedLinear(num_heads * head_dim, dim)

    def forward(self, x: Tensor, heads: int, out_features: int | None = None) -> Tensor:
        """Tokens ``(N, L, d_in)`` -> ``(N, L, out_features)`` (default: ``d_in``) using ``heads`` heads."""
        out = _attention(self.qkv(x, heads), heads, self.head_dim)
        return self.proj(out, x.shape[-1] if out_features is None else out_features)

    def to_static(self, in_features: int, heads: int, out_features: int | None = None) -> StaticAttention:
        out_features = in_features if out_features is None else out_features
        return StaticAttention(
            self.qkv.to_static(in_features, heads),
            self.proj.to_static(heads * self.head_dim, out_features),
            heads,
            self.head_dim,
        )


class SlicedMlp(SliceableModule):
    """``fc2(GELU(fc1(x)))`` over a prefix of the hidden units (timm names ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = SlicedLinear(dim, hidden)
        self.fc2 = SlicedLinear(hidden, dim)

    def forward(self, x: Tensor, hidden: int, out_features: int | None = None) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x, hidden)), x.shape[-1] if out_features is None else out_features)

    def to_static(self, in_features: int, hidden: int, out_features: int | None = None) -> nn.Sequential:
        out_features = in_features if out_features is None else out_features
        return nn.Sequential(
            self.fc1.to_static(in_features, hidden), nn.GELU(), self.fc2.to_static(hidden, out_features)
        )


class DSViTBlock(nn.Module):
    """Pre-norm transformer block whose widths are chosen per call.

    ``width`` is the number of embedding dims the block computes on
    (LayerNorms over the first ``width`` dims, q/k/v read them, the output
    projection and ``fc2`` write them). ``heads`` (whole heads of the fixed
    ``head_dim``) and ``hidden`` (MLP hidden units) are separate dimensions;
    left out, they follow the width as in the DeiT family: ``width //
    head_dim`` heads (``width`` must then be a multiple of ``head_dim``) and
    ``round(mlp_ratio * width)`` hidden units. What happens to the other dims
    of the stream is :func:`residual_at_width`'s ``idle`` choice.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float, qkv_bias: bool = True, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden = int(round(mlp_ratio * dim))
        self.norm1 = SlicedLayerNorm(dim, eps)
        self.attn = SlicedAttention(dim, num_heads, head_dim, qkv_bias)
        self.norm2 = SlicedLayerNorm(dim, eps)
        self.mlp = SlicedMlp(dim, self.mlp_hidden)

    def heads(self, width: int) -> int:
        """The heads that go with ``width`` embedding dims when the two are tied."""
        if width % self.head_dim or not 0 < width <= self.dim:
            raise ValueError(
                f"block width must be a multiple of head_dim={self.head_dim} up to {self.dim}, got {width}"
            )
        return width // self.head_dim

    def hidden(self, width: int) -> int:
        """The MLP hidden units that go with ``width`` embedding dims when the two are tied."""
        return int(round(self.mlp_ratio * width))

    def dims(self, width: int, heads: int | None = None, hidden: int | None = None) -> tuple[int, int]:
        """``(heads, hidden)`` for ``to_static``: the given ones (checked), or those tied to ``width``.

        ``forward`` leaves the checks to the sliced layers (they check every call), so its hot path pays none.
        """
        for name, value, top in (("width", width, self.dim), ("heads", heads, self.num_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top):
                raise ValueError(f"block {name} must be an int in 1..{top}, got {value!r}")
        if hidden is not None and (
            isinstance(hidden, bool) or not isinstance(hidden, int) or not 0 < hidden <= self.mlp_hidden
        ):
            raise ValueError(f"block MLP hidden width must be an int in 1..{self.mlp_hidden}, got {hidden!r}")
        return (
            self.heads(width) if heads is None else heads,
            self.hidden(width) if hidden is None else hidden,
        )

    def forward(self, x: Tensor, width: int, idle: bool, heads: int | None = None, hidden: int | None = None) -> Tensor:
        if heads is None:
            heads = self.heads(width)
        if hidden is None:
            hidden = self.hidden(width)

        def body(y: Tensor) -> Tensor:
            y = y + self.attn(self.norm1(y), heads)
            return y + self.mlp(self.norm2(y), hidden)

        return residual_at_width(x, width, idle, body)

    def to_static(self, width: int, idle: bool, heads: int | None = None, hidden: int | None = None) -> StaticViTBlock:
        heads, hidden = self.dims(width, heads, hidden)
        return StaticViTBlock(
            self.norm1.to_static(width),
            self.attn.to_static(width, heads),
            self.norm2.to_static(width),
            self.mlp.to_static(width, hidden),
            width,
            idle,
        )


class TokenGate(DynamicGate):
    """The double-headed DS-Net gate for token streams ``(N, L, D)``.

    Encoder ``z = ReLU(FC_r(pool(BN(h))))``: ``pool`` is the mean over patch
    tokens (``"avg"``) or the class token (``"token"``); the BN's statistics are
    over the pooled tokens (see :func:`normalized_pool`). The BatchNorm (on by
    default) is there because a ViT's residual stream is unnormalised and its
    channels differ in scale by orders of magnitude (and grow with depth);
    a per-channel, dataset-level normalisation puts the gate's input on one
    scale *without* removing the per-sample magnitude differences a
    LayerNorm would erase, which are part of what tells easy inputs from
    hard ones. Its running statistics are per slot, like every dsnet BN (the
    training-only largest sub-network feeds it a wider stream).

    Attention head: ``h <- h * sigmoid(FC_e(z))`` on the embedding channels of
    every token. Slimming head: ``FC_g(z)``, as :class:`DynamicGate`.
    """

    def __init__(
        self,
        channels: int,
        num_choices: int,
        num_slots: int,
        se_ratio: float = 0.25,
        pool: str = "avg",
        num_prefix_tokens: int = 1,
        batch_norm: bool = True,
    ) -> None:
        check_pool(pool, num_prefix_tokens)
        super().__init__(channels, num_choices, se_ratio)
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.bn = SlicedBatchNorm2d(channels, num_slots) if batch_norm else None

    def pooled(self, h: Tensor, slot: int = 0) -> Tensor:
        bn = None if self.bn is None else lambda t: self.bn(t, slot)
        return normalized_pool(h, self.pool, self.num_prefix_tokens, bn)

    def encode(self, h: Tensor, slot: int = 0) -> Tensor:  # type: ignore[override]
        """The shared encoder; ``slot`` picks the BN statistics of the stage the gate sits after."""
        return F.relu(self.reduce(self.pooled(h, slot)))

    def attend(self, h: Tensor, z: Tensor) -> Tensor:
        return h * self.attention(z, h.shape[-1])[:, None, :]

    def forward(self, h: Tensor, slot: int = 0) -> Tensor:
        return self.attend(h, self.encode(h, slot))

    def to_static(self, channels: int, slot: int = 0) -> StaticTokenGate:  # type: ignore[override]
        return StaticTokenGate(
            None if self.bn is None else self.bn.to_static(channels, slot),
            self.reduce.to_static(channels),
            self.expand.to_static(self.reduced, channels),
            self.pool,
            self.num_prefix_tokens,
            self._static_gain(),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool}, batch_norm={self.bn is not None}"


# --------------------------------------------------------------------------- static equivalents
class StaticAttention(nn.Module):
    """Compact multi-head self-attention: ``qkv`` rows are ``[q | k | v]`` of ``num_heads`` heads."""

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.qkv = qkv
        self.proj = proj
        self.num_heads = num_heads
        self.head_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(_attention(self.qkv(x), self.num_heads, self.head_dim))


class StaticViTBlock(nn.Module):
    """Pre-norm transformer block on the first ``width`` dims of the stream (idle or plain: ``residual_at_width``)."""

    def __init__(
        self,
        norm1: nn.LayerNorm,
        attn: StaticAttention,
        norm2: nn.LayerNorm,
        mlp: nn.Sequential,
        width: int,
        idle: bool,
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp
        self.width = width
        self.idle = idle

    def _body(self, y: Tensor) -> Tensor:
        y = y + self.attn(self.norm1(y))
        return y + self.mlp(self.norm2(y))

    def forward(self, x: Tensor) -> Tensor:
        return residual_at_width(x, self.width, self.idle, self._body)

    def extra_repr(self) -> str:
        return f"width={self.width}, idle={self.idle}"


class StaticTokenEmbed(nn.Module):
    """Patch embedding, class token and (resampled) position embedding."""

    def __init__(self, proj: nn.Conv2d, cls_token: Tensor | None, pos_embed: Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.proj = proj
        self.cls_token = None if cls_token is None else nn.Parameter(cls_token.detach().clone())
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())
        self.grid = tuple(grid)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        prefix = 0
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            prefix = 1
        return x + resample_pos_embed(self.pos_embed, grid, self.grid, prefix)


class StaticTokenGate(nn.Module):
    """The gate's attention head as a plain module (the slimming head is not needed once a width is fixed)."""

    def __init__(
        self,
        bn: nn.BatchNorm2d | None,
        reduce: nn.Linear,
        expand: nn.Linear,
        pool: str,
        num_prefix_tokens: int,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        self.bn = bn
        self.reduce = reduce
        self.expand = expand
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.reduce(normalized_pool(x, self.pool, self.num_prefix_tokens, self.bn)))
        attn = torch.sigmoid(self.expand(z))
        if self.gain != 1.0:
            attn = attn * self.gain
        return x * attn[:, None, :]


class StaticViTHead(nn.Module):
    """Pooling (class token or mean of patch tokens), final LayerNorm and classifier."""

    def __init__(self, norm: nn.LayerNorm, head: nn.Linear, pool: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.norm = norm
        self.head = head
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        # LayerNorm is per token, so normalising after pooling the class token equals timm's norm-then-pick
        return self.head(self.norm(pool_tokens(x, self.pool, self.num_prefix_tokens)))


def patch_embed_conv(in_chans: int, dim: int, patch_size: int) -> SlicedConv2d:
    """The patchifying convolution (kernel = stride = patch), initialised as ``nn.Conv2d`` (timm's default)."""
    conv = SlicedConv2d(in_chans, dim, patch_size, stride=patch_size, padding=0, bias=True)
    ref = nn.Conv2d(in_chans, dim, patch_size, patch_size)
    with torch.no_grad():
        conv.weight.copy_(ref.weight)
        conv.bias.copy_(ref.bias)
    return conv
