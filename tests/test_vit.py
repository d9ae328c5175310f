"""DS-ViT++: DeiT-S shape, per-head attention slicing, dynamic idle slicing, extraction, resolution changes."""

import math

import pytest
import torch
import torch.nn.functional as F

import dsnet
from dsnet.layers.transformer import DSViTBlock, SlicedAttention
from tests.conftest import perturb, sliced, small_input

DEIT_S_PARAMS = 22_050_664  # timm vit_small_patch16_224 / DeiT-S


def _perturb_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random LayerNorm affines (conftest's perturb only touches BN and the gate head), so a wrong prefix shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in f".{name}" and p.dim() == 1:
                weight = name.endswith("weight")
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if weight else torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_ds_vit_small_full_width_is_deit_small():
    model = dsnet.create_model("ds_vit_small")
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("_gate."))
    assert backbone == pytest.approx(DEIT_S_PARAMS, rel=0.005)
    macs = dsnet.count_macs(model, (1, 3, 224, 224), subnet=model.largest)
    assert macs / 1e9 == pytest.approx(4.60, rel=0.01)  # 4.24 G linear + 0.36 G attention (timm: 4.6)
    # timm names and shapes, so DeiT/timm checkpoints load into the supernet
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["blocks.11.attn.qkv.weight"] == (1152, 384) and shapes["pos_embed"] == (1, 197, 384)
    assert shapes["patch_embed.proj.weight"] == (384, 3, 16, 16) and shapes["head.weight"] == (1000, 384)
    assert [s.widths[-1] for s in model.subnets if s.routed] == [128, 192, 256, 320, 384]
    assert model.routing_space == [0, 1, 2, 3, 4] and not model.subnets[model.largest].routed


def _reference_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, head_dim):
    """Multi-head attention written out head by head from the q/k/v row blocks (no fused kernel, no MHA module)."""
    dim = qkv_w.shape[0] // 3
    rows = heads * head_dim
    d_in = x.shape[-1]
    outs = []
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        q = x @ qkv_w[:dim][sl, :d_in].T + qkv_b[:dim][sl]
        k = x @ qkv_w[dim : 2 * dim][sl, :d_in].T + qkv_b[dim : 2 * dim][sl]
        v = x @ qkv_w[2 * dim :][sl, :d_in].T + qkv_b[2 * dim :][sl]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        outs.append(attn @ v)
    return torch.cat(outs, dim=-1) @ proj_w[:, :rows].T + proj_b


@pytest.mark.parametrize("heads,d_in,d_out", [(2, 64, 64), (3, 96, 48), (4, 128, 128)])
def test_attention_per_head_slicing_matches_reference(heads, d_in, d_out):
    torch.manual_seed(0)
    attn = SlicedAttention(dim=128, num_heads=4, head_dim=32).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 9, d_in)
    w, b = attn.qkv.weight, attn.qkv.bias
    expected = _reference_attention(x, w, b, attn.proj.weight[:d_out], attn.proj.bias[:d_out], heads, 32)
    with torch.no_grad():
        sliced = attn(x, heads, d_out)
        static = attn.to_static(d_in, heads, d_out)
        torch.testing.assert_close(sliced, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static(x), expected, rtol=1e-5, atol=1e-5)
    assert static.qkv.weight.shape == (3 * heads * 32, d_in) and static.proj.weight.shape == (d_out, heads * 32)
    if heads < 4:  # a plain row prefix would take q and k rows of the *same* block: not the same network
        assert not torch.equal(static.qkv.weight, w[: 3 * heads * 32, :d_in])


def test_idle_slicing_carries_idle_dims_plain_slicing_drops_them():
    torch.manual_seed(0)
    block = _perturb_norms(DSViTBlock(dim=128, num_heads=4, head_dim=32, mlp_ratio=2.0)).eval()
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        idle = block(x, 64, idle=True)
        plain = block(x, 64, idle=False)
        full = block(x, 128, idle=True)
    assert idle.shape == x.shape and torch.equal(idle[..., 64:], x[..., 64:])  # idle dims: bit for bit
    assert not torch.allclose(idle[..., :64], x[..., :64])  # the active dims did compute
    assert plain.shape == (2, 5, 64)  # plain slicing narrows the stream: dims 64: are gone
    torch.testing.assert_close(plain, idle[..., :64])  # same computation on the active dims
    assert not torch.allclose(full[..., 64:], x[..., 64:])
    # plain slicing widens a narrow stream with zeros (what a prefix-sliced weight reads for missing features)
    with torch.no_grad():
        torch.testing.assert_close(block(x[..., :64], 128, idle=False), block(F.pad(x[..., :64], (0, 64)), 128, True))


def test_idle_and_plain_models_share_block_compute():
    idle = dsnet.create_model("ds_vit_cifar")
    plain = dsnet.create_model("ds_vit_cifar", idle_slicing=False)
    assert [s.widths[1:] for s in idle.subnets] == [s.widths[1:] for s in plain.subnets]
    assert idle.subnets[0].widths[0] == 128 and plain.subnets[0].widths[0] == 32
    m_idle, m_plain = idle.subnet_macs(), plain.subnet_macs()
    # the slim plain network embeds at 32 dims and classifies from 32; the idle one from all 128
    assert m_plain[0] < m_idle[0] and m_plain[-1] == m_idle[-1]
    with torch.no_grad():
        x = small_input(idle, batch=2)
        h, _ = idle.eval().forward_pre(x, 0)
        assert h.shape[-1] == 128
        h, _ = plain.eval().forward_pre(x, 0)
        assert h.shape[-1] == 32


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"idle_slicing": False},
        {"gate_pool": "token", "global_pool": "avg", "gate_stage": 1, "depths": (1, 2)},
        {"class_token": False, "global_pool": "avg", "gate_bn": False, "idle_slicing": False, "depths": (1, 1, 2)},
    ],
)
def test_extracted_equals_sliced_with_perturbed_layernorms(kwargs):
    torch.manual_seed(0)
    model = _perturb_norms(perturb(dsnet.create_model("ds_vit_cifar", **kwargs)))
    x = small_input(model, batch=3)
    with torch.no_grad():
        for k in range(len(model.subnets)):
            static = model.extract(k)
            torch.testing.assert_close(sliced(model, x, k), static(x), rtol=0, atol=1e-5)
        # dynamic inference equals each sample's own sub-network
        routed = model(x, return_routing=True)
        for i in range(len(x)):
            torch.testing.assert_close(routed.logits[i : i + 1], model(x[i : i + 1], subnet=routed.subnet[i].item()))


def test_position_embedding_resampled_for_other_resolutions_and_cached():
    model = dsnet.create_model("ds_vit_cifar").eval()
    x = torch.randn(2, 3, 48, 48)  # 12x12 grid instead of 8x8
    with torch.no_grad():
        a = sliced(model, x, 1)
        b = model.extract(1)(x)
        model(x, subnet=2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(model._pos_cache) == 1  # one entry per grid, shared by every width
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # an in-place update invalidates the cached resampling
        assert not torch.allclose(model(x, subnet=1), a)
    model.train()
    model(x, subnet=0).sum().backward()  # training differentiates through the resampling
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="head_choices"):
        dsnet.create_model("ds_vit_cifar", head_choices=[0, 2])
    with pytest.raises(ValueError, match="class token"):
        dsnet.create_model("ds_vit_cifar", class_token=False)  # global_pool="token" needs one
    block = DSViTBlock(dim=128, num_heads=4, head_dim=32, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        block(torch.randn(1, 3, 128), 48, idle=True)


def test_training_batch_of_one_image():
    """The gate's BN takes statistics over tokens, so a trailing batch of one image trains."""
    model = dsnet.create_model("ds_vit_cifar").train()
    result = model(torch.randn(1, 3, 32, 32), return_routing=True)
    result.logits.sum().backward()
    assert model.gate.bn.num_batches_tracked.sum() == 1
