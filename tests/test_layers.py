"""Sliceable layers: prefix semantics, static equivalents, private BN statistics, weight caches."""

import pytest
import torch
from torch import nn

from dsnet.layers import SlicedBatchNorm2d, SlicedConv2d, SlicedLayerNorm, SlicedLinear


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_uses_prefix_and_matches_static(depthwise):
    torch.manual_seed(0)
    conv = SlicedConv2d(16, 16 if depthwise else 24, 3, stride=2, depthwise=depthwise, bias=True)
    x = torch.randn(2, 8, 9, 9)
    y = conv(x, None if depthwise else 12)
    assert y.shape == (2, 8 if depthwise else 12, 5, 5)
    static = conv.to_static(8, 12)
    assert isinstance(static, nn.Conv2d) and static.weight.shape[0] == (8 if depthwise else 12)
    torch.testing.assert_close(y, static(x), rtol=0, atol=0)
    # the prefix really is the first channels of the dense weight
    groups = 8 if depthwise else 1
    ref = nn.functional.conv2d(
        x, conv.weight[: y.shape[1], : (1 if depthwise else 8)], conv.bias[: y.shape[1]], 2, 1, 1, groups
    )
    torch.testing.assert_close(y, ref)


def test_linear_and_layernorm_prefix():
    lin = SlicedLinear(10, 6)
    x = torch.randn(3, 7)
    torch.testing.assert_close(lin(x, 4), lin.to_static(7, 4)(x))
    ln = SlicedLayerNorm(10)
    nn.init.normal_(ln.weight)
    torch.testing.assert_close(ln(x), ln.to_static(7)(x))


def test_layer_errors_name_the_problem():
    conv = SlicedConv2d(8, 8, 3)
    with pytest.raises(ValueError, match="holds 8 input channels, got 9"):
        conv(torch.randn(1, 9, 4, 4))
    with pytest.raises(ValueError, match="holds 8 output channels, asked for 16"):
        conv(torch.randn(1, 8, 4, 4), 16)


def test_batchnorm_statistics_are_private_per_slot():
    bn = SlicedBatchNorm2d(8, num_slots=3)
    before = bn.running_mean.clone(), bn.running_var.clone()
    bn.train()
    for _ in range(3):
        bn(torch.randn(4, 8, 3, 3) * 3 + 2, slot=1)
    assert torch.equal(bn.running_mean[[0, 2]], before[0][[0, 2]])
    assert torch.equal(bn.running_var[[0, 2]], before[1][[0, 2]])
    assert not torch.equal(bn.running_mean[1], before[0][1])
    assert bn.num_batches_tracked.tolist() == [0, 3, 0]


def test_batchnorm_cumulative_average_when_momentum_is_none():
    bn = SlicedBatchNorm2d(4, num_slots=2, momentum=None)
    bn.train()
    batches = [torch.randn(8, 4, 2, 2) + i for i in range(4)]
    for b in batches:
        bn(b, slot=0)
    expected = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean[0], expected)


def test_batchnorm_static_equivalent_uses_its_slot():
    bn = SlicedBatchNorm2d(8, num_slots=2)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(bn(x, 1), bn.to_static(5, 1).eval()(x))
    assert not torch.allclose(bn(x, 0), bn(x, 1))


def test_inference_weight_cache_follows_weight_updates():
    conv = SlicedConv2d(16, 16, 3)
    x = torch.randn(1, 8, 5, 5)
    with torch.inference_mode():
        y1 = conv(x, 8)
    assert len(conv._cache) == 1  # non-contiguous input slice cached
    with torch.no_grad():
        conv.weight.mul_(2.0)  # an in-place update, as an optimiser step makes
    with torch.inference_mode():
        y2 = conv(x, 8)
    torch.testing.assert_close(y2, 2 * y1)
    conv.load_state_dict({"weight": torch.zeros_like(conv.weight)})
    with torch.no_grad():
        assert conv(x, 8).abs().max() == 0
    # training (grad enabled) never uses the cache: gradients reach the dense weight
    conv(x, 8).sum().backward()
    assert conv.weight.grad[:8, :8].abs().sum() > 0 and conv.weight.grad[8:].abs().sum() == 0
