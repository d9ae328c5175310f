"""scripts/router_ceiling.py: what each selector sees, how its curve is traced, and its bounds (tiny model)."""

from __future__ import annotations

import torch

import dsnet
from scripts import router_ceiling as rc
from tests.conftest import perturb


def _loader(n: int, seed: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.2)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_slim_info_features_ignore_the_wider_choices_and_full_info_does_not():
    torch.manual_seed(0)
    logits = torch.randn(50, 4, 10)
    other = logits.clone()
    other[:, 1:] = torch.randn(50, 3, 10)  # only the wider choices change
    assert torch.equal(rc.features(logits, full=False), rc.features(other, full=False))
    assert not torch.allclose(rc.features(logits, full=True), rc.features(other, full=True))


def test_the_curve_spans_from_the_best_score_to_the_slimmest():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    correct = torch.tensor([[False, True], [True, False], [False, False]])
    costs = torch.tensor([1.0, 4.0], dtype=torch.float64)
    points = rc.curve(scores, correct, costs)
    assert points[0]["lam"] == 0.0
    assert points[0]["mix"] == [1 / 3, 2 / 3] and abs(points[0]["top1"] - 200 / 3) < 1e-9
    assert points[-1]["mix"] == [1.0, 0.0] and points[-1]["mean_macs"] == 1.0  # lam > 1: every image to the slimmest
    assert all(a["mean_macs"] >= b["mean_macs"] for a, b in zip(points, points[1:]))  # cost falls as lam grows


def test_measure_on_a_tiny_model_stays_under_its_oracle():
    torch.manual_seed(0)
    model = perturb(dsnet.create_model("ds_resnet8_tiny", gate_mode="exit", num_classes=10)).eval()
    result = rc.measure(model, _loader(96, 1), _loader(64, 2), seed=0)
    choice_macs = result["routing_choice_macs"]
    assert choice_macs == sorted(choice_macs) and len(choice_macs) == len(model.routing_space)
    for name in ("slim-info", "full-info", "max-confidence"):
        sel = result["selectors"][name]
        assert sel["best_top1"] <= result["oracle_any_choice_right"] + 1e-9
    full = result["selectors"]["full-info"]
    assert abs(sum(full["mix_at_best"]) - 1.0) < 1e-9
    assert full["top1_at_gate_macs"] <= result["oracle_at_gate_macs"] + 1e-9
    assert "full-info" in rc.render([result]) and "oracle" in rc.render([result])
