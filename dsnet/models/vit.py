"""DS-ViT++: vision transformers with dynamic weight slicing (DS-Net++).

At full width every layer has the shape (and the timm parameter names) of the
standard timm/DeiT ``VisionTransformer``: ``ds_vit_small`` is DeiT-S
(patch 16, 224 px, dim 384, 6 heads of 64, depth 12, MLP ratio 4, qkv bias,
class token, LayerNorm eps 1e-6; 22,050,664 parameters) plus the gate.

**Widths.** By default heads and embedding dims slice *together*: a width is a number of
embedding dims ``w`` that is a multiple of the fixed ``head_dim`` (64 for
ViT-S/Ti), and a block at width ``w`` runs ``w / head_dim`` heads, an MLP of
``mlp_ratio * w`` hidden units and LayerNorms over the first ``w`` dims. This
keeps every sub-network a well-formed ViT (``embed = heads * head_dim``,
``mlp = 4 * embed``, as the DeiT family itself scales). Routed choices default
to ``num_heads // 3 .. num_heads`` heads: 2..6 for ViT-S (embed 128..384, width
ratios 1/3..1), 1..3 for ViT-Ti.

**Separate dimensions** (``separate_dims=True``). Embedding width, heads and
MLP hidden width become three dimensions of their own in every block group,
so a sub-network can be, say, narrow in the MLP and wide in heads. Each group
then has three stages, ``blocksA-B.embed`` (embedding dims its blocks compute
on: LayerNorms, q/k/v inputs, projection and ``fc2`` outputs, i.e. the slice
of the residual stream), ``blocksA-B.heads`` (active heads, ``head_dim``
fixed) and ``blocksA-B.mlp`` (active hidden units), and ``subnet_widths``
lists sub-networks in that layout: flat, one width per stage, as
``model.subnets[k].widths`` reports them, or nested, ``[embed, [e, h, m],
[e, h, m], ...]`` (the embedding stage, then one triple per group). Without
``subnet_widths`` the sub-networks are the tied ones above, written in the
separate layout: the same routing space, parameters and outputs, bit for bit,
so every checkpoint loads either way. ``model.block_dims(k)`` gives the
``(embed, heads, mlp)`` triples of sub-network ``k`` in either layout.

**Stages.** ``embed`` (patch embedding, class token, position embedding) is
stage 0; the blocks are split into groups (``depths``, default 3 + 9 for
12 blocks), each a stage. Stages before ``gate_stage`` (default 2: the gate
sits after the first group of 3 blocks, a quarter of the depth, where the
DS-Net gate of MobileNetV1 and DS-ResNet sit relative to their compute) run
once per batch at the pre-gate width ``pre_gate_heads`` (default: the slimmest
routed choice). Routed stages use index-aligned choices. As the pre-gate stages
also have the full width, the full network is the training-only largest
sub-network (the in-place distillation teacher).

**Dynamic idle slicing** (``idle_slicing=True``, the default, DS-Net++): the
patch embedding always produces all ``D`` dims (stage ``embed`` has the single
width ``D``); a block at width ``w`` computes on dims ``:w``, adds its result
to them and carries dims ``w:`` through untouched, so a slim sub-network keeps
the whole residual stream; the final norm and head read all ``D`` dims. With
``idle_slicing=False`` (plain embedding slicing) the stream itself is ``w``
wide: the embedding runs at the pre-gate width, each block cuts or zero-pads
the stream to its width, and the final norm and head read ``w`` dims. Block
compute is identical in both modes, so they can be compared like for like.

**Gate.** A :class:`~dsnet.layers.transformer.TokenGate` after the pre-gate
blocks, on the mean of the patch tokens (``gate_pool="avg"``, the ViT analogue
of the CNN gate's global pooling) or the class token (``"token"``). Its
attention head rescales the embedding channels of every token (all ``D`` under
idle slicing); its slimming head picks among ``routing_space`` (default: every
routed sub-network). Argmax at evaluation, straight-through Gumbel in training
(both in :class:`~dsnet.models.base.DynamicNet`).

**Resolution.** A 224-px model accepts other sizes: the position embedding is
resampled bicubically (as timm's dynamic image size), and cached per grid size
for inference.

**MACs.** ``count_macs`` counts every matmul, attention included: the CPU
``scaled_dot_product_attention`` kernel has no ``FlopCounterMode`` formula, so
``dsnet.macs.count_forward_macs`` registers one (``2 * L^2 * w`` per block).
DeiT-S at 224 px: 4.24 G of linear and convolution MACs + 0.36 G of attention
= 4.60 G, timm's figure for the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dsnet.layers.sliced import SlicedLayerNorm, SlicedLinear
from dsnet.layers.transformer import (
    DSViTBlock,
    SlicedQKV,
    StaticTokenEmbed,
    StaticViTHead,
    TensorCache,
    TokenGate,
    check_pool,
    patch_embed_conv,
    pool_tokens,
    resample_pos_embed,
)
from dsnet.models.base import DynamicNet
from dsnet.models.registry import register_model
from dsnet.models.static import SplitAtGate, StaticLayers

__all__ = ["DSViT", "ds_vit_small", "ds_vit_tiny", "ds_vit_cifar"]


class DSViT(SplitAtGate, DynamicNet):
    """Dynamic slimmable vision transformer.

    Args:
        img_size: native resolution (position-embedding grid).
        patch_size: patch (and patch-embedding stride) size.
        embed_dim, num_heads: full width; ``head_dim = embed_dim // num_heads``.
        depths: blocks per stage (stage 0 is the embedding).
        mlp_ratio: MLP hidden units per embedding dim.
        head_choices: routed widths, in heads (default ``num_heads // 3 .. num_heads``).
        pre_gate_heads: heads of the pre-gate stages (default: the slimmest choice).
        gate_stage: first routed stage (a block group; with ``separate_dims`` the model's ``gate_stage`` is
            that group's first stage in the separate layout).
        idle_slicing: carry idle dims (DS-Net++) or narrow the stream (plain slicing).
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of patch tokens) for the classifier.
        gate_pool: the same choice for the gate's input.
        gate_bn: BatchNorm on the gate's pooled input (see ``TokenGate``).
        routing_space: sub-networks the gate picks among (default: every routed one).
        gate_mode: ``"exit"`` (the default with two or more routing choices; what the measurements
            support) or ``"pre"`` (the paper's gate); see :meth:`DynamicNet.set_gate_mode`.
        subnet_widths: an explicit list of sub-networks (per-stage widths in embedding dims, multiples of
            ``head_dim``, slimmest first) instead of ``head_choices``/``pre_gate_heads``; with
            ``separate_dims``, per-stage widths of that layout (flat, or ``[embed, [e, h, m], ...]``).
        separate_dims: embedding width, heads and MLP hidden width as separate dimensions of every block
            group (stages ``blocksA-B.embed``, ``.heads``, ``.mlp``) instead of one tied width per group.
        router: ``"logits"`` (the paper's gate logits) or ``"utility"`` (per-choice P(correct); see
            :class:`DynamicNet`).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        num_heads: int = 6,
        depths: Sequence[int] = (3, 9),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        global_pool: str = "token",
        norm_eps: float = 1e-6,
        head_choices: Sequence[int] | None = None,
        pre_gate_heads: int | None = None,
        gate_stage: int = 2,
        idle_slicing: bool = True,
        gate_pool: str = "avg",
        gate_bn: bool = True,
        se_ratio: float = 0.25,
        routing_space: Sequence[int] | None = None,
        gate_mode: str | None = None,
        subnet_widths: Sequence[Sequence[int]] | None = None,
        router: str = "logits",
        separate_dims: bool = False,
    ) -> None:
        if min(embed_dim, num_heads, patch_size, img_size) < 1 or mlp_ratio <= 0 or se_ratio <= 0:
            raise ValueError(
                "embed_dim, num_heads, patch_size, img_size, mlp_ratio and se_ratio must be positive, got "
                f"{embed_dim}, {num_heads}, {patch_size}, {img_size}, {mlp_ratio}, {se_ratio}"
            )
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if not depths or min(depths) < 1:
            raise ValueError(f"depths needs one positive block count per stage, got {list(depths)}")
        num_prefix = 1 if class_token else 0
        check_pool(global_pool, num_prefix)
        check_pool(gate_pool, num_prefix)
        head_dim = embed_dim // num_heads
        choices = sorted(set(head_choices or range(max(1, num_heads // 3), num_heads + 1)))
        if choices[0] < 1 or choices[-1] > num_heads:
            raise ValueError(f"head_choices must lie in 1..{num_heads}, got {choices}")
        pre_heads = choices[0] if pre_gate_heads is None else pre_gate_heads
        if not 0 < pre_heads <= num_heads:
            raise ValueError(f"pre_gate_heads must lie in 1..{num_heads}, got {pre_heads}")
        full, pre = embed_dim, pre_heads * head_dim
        pre_widths = tuple(sorted({pre, full}))
        block_widths = [
            pre_widths if s < gate_stage else tuple(h * head_dim for h in choices) for s in range(1, len(depths) + 1)
        ]
        bounds = [sum(depths[:i]) for i in range(len(depths) + 1)]
        group_names = tuple(f"blocks{bounds[i]}-{bounds[i + 1] - 1}" for i in range(len(depths)))
        if not isinstance(separate_dims, bool):
            raise TypeError(f"separate_dims must be True or False, got {separate_dims!r}")
        if separate_dims:
            if not 0 < gate_stage <= len(depths):
                raise ValueError(f"gate_stage must name a block group 1..{len(depths)}, got {gate_stage}")
            # the tied widths, each group written as its three dimensions (embed dims, heads, hidden units)
            stage_names = ("embed",) + tuple(f"{g}.{d}" for g in group_names for d in ("embed", "heads", "mlp"))
            block_widths = [
                dims
                for ws in block_widths
                for dims in (ws, tuple(w // head_dim for w in ws), tuple(int(round(mlp_ratio * w)) for w in ws))
            ]
            if subnet_widths is not None:
                subnet_widths = [_flat_dims(entry, len(depths), i) for i, entry in enumerate(subnet_widths)]
        else:
            stage_names = ("embed",) + group_names
            if subnet_widths is not None and any(isinstance(w, Sequence) for e in subnet_widths for w in e):
                raise ValueError("subnet_widths: nested (embed, heads, mlp) entries need separate_dims=True")
        stage_widths = [(full,) if idle_slicing else pre_widths, *block_widths]
        n_routed = len(choices)
        super().__init__(
            stage_names,
            stage_widths,
            1 + 3 * (gate_stage - 1) if separate_dims else gate_stage,
            in_chans,
            num_classes,
            (in_chans, img_size, img_size),
            (list(range(n_routed)) if subnet_widths is None else None) if routing_space is None else routing_space,
            subnet_widths,
            router=router,
        )
        if subnet_widths is not None:
            for net in self.subnets:
                odd = [f"{n}={w}" for n, w in zip(stage_names[1:], net.widths[1:]) if w % head_dim]
                if odd and not separate_dims:
                    raise ValueError(f"subnet_widths: block widths must be multiples of head_dim={head_dim}: {odd}")
                if idle_slicing and net.widths[0] != embed_dim:
                    raise ValueError(f"subnet_widths: with idle slicing the embed stage is always {embed_dim} wide")
        self.embed_dim = embed_dim
        self.head_dim = head_dim
        self.patch_size = patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = num_prefix
        self.global_pool = global_pool
        self.idle_slicing = idle_slicing
        self.head_choices = choices
        self.separate_dims = separate_dims
        self.gate_group = gate_stage  # the block group the gate runs before (gate_stage counts groups)

        # timm parameter names, so timm/DeiT state dicts load (gate aside)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = patch_embed_conv(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + self.grid[0] * self.grid[1], embed_dim))
        self.blocks = nn.ModuleList(
            DSViTBlock(embed_dim, num_heads, head_dim, mlp_ratio, qkv_bias, norm_eps) for _ in range(bounds[-1])
        )
        self._block_stage = [s for s in range(1, len(depths) + 1) for _ in range(depths[s - 1])]  # group of block
        self._dims = [self._dims_of(net.widths, len(depths)) for net in self.subnets]
        self.gate_block = bounds[gate_stage - 1]  # the gate runs before this block
        self._gate = TokenGate(
            embed_dim, len(self.routing_space), self.num_slots, se_ratio, gate_pool, num_prefix, gate_bn
        )
        self.norm = SlicedLayerNorm(embed_dim, norm_eps)
        self.head = SlicedLinear(embed_dim, num_classes)
        self._pos_cache = TensorCache()
        self._init_weights()
        self.set_gate_mode(gate_mode)

    def width_multiple(self, stage: int) -> int:
        """Tied block widths are whole heads; a separate heads stage counts heads (1); the rest: multiples of 8."""
        if self.separate_dims:
            return 1 if self.subnets[0].stage_names[stage].endswith(".heads") else 8
        return self.head_dim if stage > 0 else 8

    def group_stages(self, group: int) -> tuple[int, int, int]:
        """Indices into ``widths`` of block group ``group``'s (embed, heads, mlp) (one shared index when tied)."""
        if not 0 < group <= len(self._dims[0]):
            raise ValueError(f"block groups are 1..{len(self._dims[0])}, got {group}")
        if self.separate_dims:
            first = 1 + 3 * (group - 1)
            return first, first + 1, first + 2
        return group, group, group

    def block_group(self, block: int) -> int:
        """The block group (1-based, a stage of the tied layout) block ``block`` belongs to."""
        return self._block_stage[block]

    def block_dims(self, subnet: int) -> tuple[tuple[int, int, int], ...]:
        """``(embedding width, heads, MLP hidden units)`` of every block group of ``subnet``, in either layout."""
        return self._dims[self.check_subnet(subnet)]

    def _dims_of(self, widths: Sequence[int], groups: int) -> tuple[tuple[int, int, int], ...]:
        if self.separate_dims:
            return tuple(tuple(widths[1 + 3 * g : 4 + 3 * g]) for g in range(groups))  # type: ignore[misc]
        block = self.blocks[0]
        return tuple((w, block.heads(w), block.hidden(w)) for w in widths[1:])

    def _init_weights(self) -> None:
        """timm's default ViT initialisation: truncated normal (0.02) weights, zero biases, tiny class token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in [*self.blocks.modules(), self.head]:
            if isinstance(module, SlicedLinear | SlicedQKV):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def gate(self) -> TokenGate:  # type: ignore[override]
        return self._gate

    # ------------------------------------------------------------- widths
    def _stream_width(self, subnet: int, group: int) -> int:
        """Width of the token stream after block group ``group`` (0: the embedding): always ``D`` under idle slicing."""
        if self.idle_slicing or group == 0:
            return self.subnets[subnet].widths[0]
        return self._dims[subnet][group - 1][0]

    def _pos(self, grid: tuple[int, int]) -> Tensor:
        def make() -> Tensor:
            return resample_pos_embed(self.pos_embed, grid, self.grid, self.num_prefix_tokens)

        if grid == self.grid:
            return self.pos_embed
        return self._pos_cache.get(self.pos_embed, grid, make)

    # ------------------------------------------------------------- forward
    def _embed(self, x: Tensor, width: int) -> Tensor:
        x = self.patch_embed.proj(x, width)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token[..., :width].expand(x.shape[0], -1, -1), x], dim=1)
        return x + self._pos(grid)[..., :width]

    def _run_blocks(self, x: Tensor, subnet: int, start: int, stop: int) -> Tensor:
        dims = self._dims[subnet]
        for i in range(start, stop):
            width, heads, hidden = dims[self._block_stage[i] - 1]
            x = self.blocks[i](x, width, self.idle_slicing, heads, hidden)
        return x

    def forward_pre(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        x = self._run_blocks(self._embed(x, self.subnets[subnet].widths[0]), subnet, 0, self.gate_block)
        return self.forward_gate(x, subnet)

    def forward_post(self, h: Tensor, subnet: int) -> Tensor:
        x = self._run_blocks(h, subnet, self.gate_block, len(self.blocks))
        return self.head(self.norm(pool_tokens(x, self.global_pool, self.num_prefix_tokens)))

    # ----------------------------------------------------------- extraction
    def forward_gate(self, x: Tensor, subnet: int) -> tuple[Tensor, Tensor]:
        z = self._gate.encode(x, self.slots(subnet)[self.gate_stage - 1])
        return self._gate.attend(x, z), z

    def _place_static(self, net: nn.Sequential) -> nn.Sequential:
        return net.to(self.pos_embed.device, self.pos_embed.dtype)

    def _static_layers(self, subnet: int, part: str = "all") -> StaticLayers:
        """Plain layers of sub-network ``subnet``: (before the gate, the gate's attention, after it); ``part``
        ("trunk", "post" or "all") says which are built (the others come back empty / None)."""
        widths, slots = self.subnets[subnet].widths, self.slots(subnet)
        w0 = widths[0]
        trunk: list[nn.Module] = []
        post: list[nn.Module] = []
        if part != "post":
            cls = None if self.cls_token is None else self.cls_token[..., :w0]
            trunk.append(
                StaticTokenEmbed(
                    self.patch_embed.proj.to_static(self.in_chans, w0), cls, self.pos_embed[..., :w0], self.grid
                )
            )
        gate = None
        dims = self._dims[subnet]
        for i, block in enumerate(self.blocks):
            if i == self.gate_block and part == "all":
                gate_width = self._stream_width(subnet, self.gate_group - 1)
                gate = self._gate.to_static(gate_width, slots[self.gate_stage - 1])
            layers = trunk if i < self.gate_block else post
            if layers is trunk and part != "post" or layers is post and part != "trunk":
                width, heads, hidden = dims[self._block_stage[i] - 1]
                layers.append(block.to_static(width, self.idle_slicing, heads, hidden))
        if part != "trunk":
            out = self._stream_width(subnet, len(dims))
            post.append(
                StaticViTHead(
                    self.norm.to_static(out), self.head.to_static(out), self.global_pool, self.num_prefix_tokens
                )
            )
        return trunk, gate, post

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, embed_dim={self.embed_dim}, head_dim={self.head_dim}, "
            f"idle_slicing={self.idle_slicing}, separate_dims={self.separate_dims}"
        )


def _flat_dims(entry: Sequence, groups: int, index: int) -> list[int]:
    """One ``subnet_widths`` entry of the separate layout, flat (``1 + 3 * groups`` ints) or nested, as flat ints."""
    items = list(entry)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return items  # flat; the length is checked with the other widths (explicit_subnets)
    form = f"[embed, [e, h, m] x {groups}] or {1 + 3 * groups} ints"
    if (
        len(items) != 1 + groups
        or isinstance(items[0], Sequence)
        or any(not isinstance(t, Sequence) or isinstance(t, str) or len(t) != 3 for t in items[1:])
    ):
        raise ValueError(f"subnet_widths[{index}]: expected {form} (separate_dims), got {entry!r}")
    return [items[0], *(v for t in items[1:] for v in t)]


@register_model(input_size=224)
def ds_vit_small(**kwargs) -> DSViT:
    """DS-ViT-S (DeiT-S shape, 22.05M + gate): 2..6 heads of 64 after a 3-block pre-gate, idle slicing."""
    kwargs.setdefault("embed_dim", 384)
    kwargs.setdefault("num_heads", 6)
    return DSViT(**kwargs)


@register_model(input_size=224)
def ds_vit_tiny(**kwargs) -> DSViT:
    """DS-ViT-Ti (DeiT-Ti shape, 5.72M + gate): 1..3 heads of 64 after a 3-block pre-gate, idle slicing."""
    kwargs.setdefault("embed_dim", 192)
    kwargs.setdefault("num_heads", 3)
    return DSViT(**kwargs)


@register_model(input_size=32)
def ds_vit_cifar(**kwargs) -> DSViT:
    """DS-ViT for 28-32 px images (patch 4, dim 128, 4 heads of 32, depth 6): trains on a CPU in minutes."""
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("patch_size", 4)
    kwargs.setdefault("embed_dim", 128)
    kwargs.setdefault("num_heads", 4)
    kwargs.setdefault("depths", (2, 4))
    kwargs.setdefault("mlp_ratio", 2.0)
    kwargs.setdefault("num_classes", 10)
    return DSViT(**kwargs)
