"""The baselines a gate is judged against: cascade, oracle and random router arithmetic, checked by hand."""

import pytest
import torch

from dsnet.evaluation import baselines as bl

# 4 samples, 2 choices (slimmest, widest) costing 1 and 3 MACs, of which 0.5 is the shared pre-gate part
CORRECT = torch.tensor([[True, True], [False, True], [False, False], [True, False]])
CONFIDENCE = torch.tensor([0.9, 0.4, 0.3, 0.6])
COSTS = [1.0, 3.0]
PRE = 0.5


def test_cascade_by_hand():
    p = bl.cascade_point(CORRECT, CONFIDENCE, COSTS, PRE, threshold=0.5)
    # samples 1 and 2 escalate: sample 1 is rescued by the widest, sample 2 stays wrong
    assert p["top1"] == pytest.approx(75.0)
    assert p["escalated"] == pytest.approx(0.5)
    assert p["mean_macs"] == pytest.approx(1.0 + 2 * (3.0 - 0.5) / 4)  # pre-gate part paid once
    never, always = (
        bl.cascade_point(CORRECT, CONFIDENCE, COSTS, PRE, 0.0),
        bl.cascade_point(CORRECT, CONFIDENCE, COSTS, PRE, 1.0),
    )
    assert (never["top1"], never["mean_macs"]) == (50.0, 1.0)
    assert (always["top1"], always["mean_macs"]) == (50.0, pytest.approx(3.5))  # the widest's accuracy, slim+wide-pre
    curve = bl.cascade_curve(CORRECT, CONFIDENCE, COSTS, PRE, num=5)
    assert curve[0]["escalated"] == 0.0 and curve[-1]["escalated"] == 1.0
    assert [c["mean_macs"] for c in curve] == sorted(c["mean_macs"] for c in curve)


def test_oracle_by_hand():
    curve = bl.oracle_curve(CORRECT, COSTS, num=3)
    assert (curve[0]["top1"], curve[0]["mean_macs"]) == (50.0, 1.0)  # no upgrade: the slimmest
    # only sample 1 can be rescued (the widest gets it right, 2 MACs extra); sample 2 is hopeless
    assert curve[-1]["top1"] == pytest.approx(75.0) and curve[-1]["mean_macs"] == pytest.approx(1.5)
    # three choices: the cheapest correct choice is taken, and cheap upgrades come first under a budget
    correct = torch.tensor([[True, True, True], [False, True, True], [False, False, True], [False, False, False]])
    curve = bl.oracle_curve(correct, [1.0, 2.0, 4.0], num=3)
    assert [(c["top1"], c["mean_macs"]) for c in curve] == [(25.0, 1.0), (50.0, 1.25), (75.0, 2.0)]
    # exact at any budget: a budget between two upgrades buys only the first
    assert bl.oracle_at(correct, [1.0, 2.0, 4.0], [1.0, 1.2, 1.25, 1.9, 2.0, 9.0]) == [25, 25, 50, 50, 75, 75]


def test_random_router_is_the_expectation():
    r = bl.random_router(CORRECT, COSTS, [0.25, 0.75])
    assert r["top1"] == pytest.approx(100 * (0.25 * 0.5 + 0.75 * 0.5))
    assert r["mean_macs"] == pytest.approx(0.25 * 1 + 0.75 * 3)
    # a Monte Carlo router with that mix converges to it
    g = torch.Generator().manual_seed(0)
    big = CORRECT.repeat(2000, 1)
    choice = (torch.rand(big.shape[0], generator=g) < 0.75).long()
    draw = 100 * big[torch.arange(big.shape[0]), choice].double().mean().item()
    assert draw == pytest.approx(r["top1"], abs=1.5)
    with pytest.raises(ValueError, match="one non-negative fraction per choice"):
        bl.random_router(CORRECT, COSTS, [1.0])


def test_envelope_interpolation_and_capture():
    points = [{"mean_macs": 1, "top1": 80}, {"mean_macs": 2, "top1": 79}, {"mean_macs": 3, "top1": 84}]
    env = bl.pareto_envelope(points)
    assert env == ([1.0, 3.0], [80.0, 84.0])  # the dominated point is dropped
    assert bl.curve_at(env, 2.0) == pytest.approx(82.0) and bl.curve_at(env, 9.0) == 84.0
    assert bl.oracle_capture(81.0, 80.0, 84.0) == pytest.approx(0.25)
    assert bl.oracle_capture(81.0, 80.0, 80.0) is None
