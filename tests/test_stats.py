"""Confidence intervals of top-1 accuracies and of paired differences (dsnet.evaluation.stats)."""

import math

import numpy as np
import pytest
import torch

from dsnet.evaluation.stats import interpolated_correctness, paired_difference, top1_interval


def test_wilson_interval_known_values():
    half = top1_interval(500, 1000)
    assert half.estimate == 50.0
    assert round(half.half_width, 1) == 3.1  # the rule of thumb: 50% on 1,000 images is +-3.1 points
    assert half.low == pytest.approx(46.91, abs=0.01) and half.high == pytest.approx(53.09, abs=0.01)
    nine = top1_interval(900, 1000)
    assert nine.low == pytest.approx(87.99, abs=0.01) and nine.high == pytest.approx(91.71, abs=0.01)
    # never outside [0, 100], never zero-width at the ends
    zero, full = top1_interval(0, 50), top1_interval(50, 50)
    assert zero.low == 0.0 and zero.high > 5.0 and full.high == 100.0 and full.low < 95.0
    # shrinks like 1/sqrt(n)
    assert top1_interval(5000, 10000).half_width == pytest.approx(half.half_width / math.sqrt(10), rel=5e-3)


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least one image"):
        top1_interval(0, 0)
    with pytest.raises(ValueError, match="correct must be"):
        top1_interval(11, 10)


def test_paired_difference_of_identical_vectors_is_zero_and_tighter_than_unpaired():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=g) < 0.8
    same = paired_difference(a, a.clone())
    assert same.estimate == 0.0 and same.half_width == 0.0
    b = a.clone()
    flip = torch.randperm(1000, generator=g)[:40]
    b[flip] = ~b[flip]  # the methods disagree on 40 images only
    diff = paired_difference(a, b)
    assert diff.estimate == pytest.approx(100.0 * (a.double().mean() - b.double().mean()).item())
    d = 100.0 * (a.double() - b.double()).numpy()
    assert diff.half_width == pytest.approx(1.959964 * d.std(ddof=1) / math.sqrt(1000), rel=1e-5)
    unpaired = math.hypot(top1_interval(int(a.sum()), 1000).half_width, top1_interval(int(b.sum()), 1000).half_width)
    assert diff.half_width < unpaired / 2


def test_paired_difference_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        paired_difference(torch.ones(3), torch.ones(4))


def test_interpolated_correctness_mean_is_the_interpolated_curve():
    g = torch.Generator().manual_seed(1)
    vectors = [torch.rand(200, generator=g) < p for p in (0.5, 0.7, 0.9)]
    macs = [1.0, 2.0, 4.0]
    accs = [v.double().mean().item() for v in vectors]
    for at in (0.5, 1.0, 1.25, 2.0, 3.0, 4.0, 9.0):
        mixed = interpolated_correctness(macs, vectors, at)
        assert mixed.mean().item() == pytest.approx(float(np.interp(at, macs, accs)))
    # a point on the curve's first node is that node's own vector: the paired margin is exact there
    assert torch.equal(interpolated_correctness(macs, vectors, 1.0), vectors[0].double())
