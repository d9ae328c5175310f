"""Explicit sub-network lists, US-Nets (width grid, continuous sampling, width at run time, per-width BN
calibration) and networks trained alone."""

import collections

import pytest
import torch

import dsnet
from dsnet.baselines import alone_config, alone_widths, usnet_config, usnet_widths
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.config import resolve_config
from dsnet.train.supernet import sample_subnets
from tests.conftest import sliced, small_input


@pytest.mark.parametrize(
    "widths, match",
    [
        ([[16, 16, 64, 128], [16, 16, 16, 32]], "slimmest first and widest last"),
        ([[16, 16, 16, 32], [32, 32, 64, 128]], "stages before the gate"),
        ([[16, 16, 16, 32], [16, 16, 64, 136]], "outside 1..the layer's size"),
        ([[16, 16, 32]], "one width per stage"),
        ([[16, 16, 32, 64], [16, 16, 32, 64]], "distinct"),
    ],
)
def test_explicit_subnets_reject_bad_lists(widths, match):
    with pytest.raises(ValueError, match=match):
        dsnet.create_model("ds_resnet8_tiny", subnet_widths=widths)


def test_explicit_subnets_are_all_routed_and_extract_like_any_model():
    nets = [[16, 16, 16, 32], [16, 16, 40, 72], [16, 16, 64, 128]]
    model = dsnet.create_model("ds_resnet8_tiny", subnet_widths=nets).eval()
    assert [list(s.widths) for s in model.subnets] == nets and all(s.routed for s in model.subnets)
    assert model.largest == 2 and model.routing_space == [0, 1, 2]
    x = small_input(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(sliced(model, x, 1), model.extract(1)(x), rtol=0, atol=1e-5)


def test_vit_explicit_widths_must_be_whole_heads():
    with pytest.raises(ValueError, match="multiples of head_dim"):
        dsnet.create_model("ds_vit_cifar", subnet_widths=[[128, 32, 32], [128, 32, 40]])
    vit = dsnet.create_model("ds_vit_cifar")
    grid = usnet_widths(vit)
    assert all(w[2] % vit.head_dim == 0 for w in grid) and grid[0][2] < grid[-1][2]


def test_usnet_grid_is_every_rounded_width_nested_and_keeps_the_pre_gate_trunk():
    family = dsnet.create_model("ds_resnet8_tiny")
    grid = usnet_widths(family)
    routed = [s.widths for s in family.subnets if s.routed]
    assert tuple(grid[0]) == routed[0] and tuple(grid[-1]) == routed[-1]  # r_min = the slimmest's multiplier
    assert all(w[:2] == grid[0][:2] for w in grid)  # stem and layer1 (before the gate) never change
    assert all(v % 8 == 0 for w in grid for v in w)
    assert all(all(a <= b for a, b in zip(n1, n2)) and n1 != n2 for n1, n2 in zip(grid, grid[1:]))
    # every multiple of 8 the last stage can take between the slimmest and the widest appears
    assert sorted({w[3] for w in grid}) == list(range(32, 129, 8))
    for uniform in routed:  # DS-Net's four uniform widths are grid points
        assert list(uniform) in grid


def test_width_multiplier_picks_the_nearest_subnet():
    model = dsnet.create_model("ds_resnet8_tiny", subnet_widths=usnet_widths(dsnet.create_model("ds_resnet8_tiny")))
    ratios = [model.width_ratio(k) for k in range(len(model.subnets))]
    assert ratios[0] == pytest.approx(0.25) and ratios[-1] == 1.0 and ratios == sorted(ratios)
    for r in (0.25, 0.3, 0.61, 0.999, 1.0):
        k = model.subnet_for_width(r)
        assert abs(ratios[k] - r) == min(abs(q - r) for q in ratios)
    x = small_input(model, batch=2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, width=0.6), model(x, subnet=model.subnet_for_width(0.6)))
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="width must be a multiplier"):
            model(x, width=bad)
    with pytest.raises(ValueError, match="not both"):
        model(x, subnet=0, width=0.5)


def test_continuous_width_sampling_is_a_seeded_sandwich_over_the_grid():
    model = dsnet.create_model("ds_resnet8_tiny", subnet_widths=usnet_widths(dsnet.create_model("ds_resnet8_tiny")))
    n = len(model.subnets)
    counts = collections.Counter()
    for step in range(400):
        picks = sample_subnets(model, step, seed=3, num_random=2, width_sampling="continuous")
        assert picks[0] == model.largest == n - 1 and picks[-1] == 0 and len(picks) == 4
        counts.update(picks[1:-1])
        assert picks == sample_subnets(model, step, seed=3, num_random=2, width_sampling="continuous")
    assert set(counts) == set(range(n))  # every grid point is reachable, the end points included
    # r ~ U[0.25, 1]: a grid point is drawn about as often as its share of the multiplier range
    ratios = [model.width_ratio(k) for k in range(n)]
    edges = [0.25] + [(a + b) / 2 for a, b in zip(ratios, ratios[1:])] + [1.0]
    for k in range(n):
        share = (edges[k + 1] - edges[k]) / 0.75
        assert abs(counts[k] / 800 - share) < 0.04, (k, counts[k] / 800, share)


def test_a_network_trained_alone_trains_its_one_subnet():
    model = dsnet.create_model("ds_resnet8_tiny", subnet_widths=[[16, 16, 32, 64]])
    assert sample_subnets(model, 0, 0, 2) == [0]
    cfg = resolve_config({"model": {"name": "ds_resnet8_tiny"}, "data": {"dataset": "synthetic"}})
    widths = alone_widths(cfg, 10, 1)
    assert widths == [list(s.widths) for s in dsnet.create_model("ds_resnet8_tiny").subnets if s.routed]
    alone = alone_config(cfg, widths[1])
    assert alone["model"]["kwargs"]["subnet_widths"] == [widths[1]] and alone["supernet"]["distill"] == "none"
    us = usnet_config(cfg)
    assert us["supernet"]["distill"] == "inplace" and us["supernet"]["width_sampling"] == "continuous"
    assert us["model"]["kwargs"]["subnet_widths"][-1] == widths[-1]
    assert cfg["model"]["kwargs"] == {}  # the caller's config is not modified


def test_per_width_bn_calibration_gives_every_width_its_own_statistics():
    """US-Nets' post-training calibration: each width's running mean is the mean of its own features."""
    model = dsnet.create_model("ds_resnet8_tiny", in_chans=1, subnet_widths=[[16, 16, 16, 32], [16, 16, 64, 128]])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=g) * 2 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    bn = model.blocks[2].bn1  # layer3's first BN: a private slot per width
    slot = {k: model.slots(k)[3] for k in (0, 1)}
    assert slot[0] != slot[1]
    seen = collections.defaultdict(list)  # the features the calibration passes feed it, by width
    hook = bn.register_forward_pre_hook(lambda m, args: seen[args[0].shape[1]].append(args[0].mean((0, 2, 3))))
    calibrate_bn(model, batches, num_batches=3, progress=False)
    hook.remove()
    for k, width in ((0, 32), (1, 128)):
        assert len(seen[width]) == 3
        expected = torch.stack(seen[width]).mean(0)  # equal batches: the cumulative mean is the mean of means
        torch.testing.assert_close(bn.running_mean[slot[k], :width], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bn.running_mean[slot[0], :32], bn.running_mean[slot[1], :32])
