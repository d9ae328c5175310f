"""The utility router (``router="utility"``), the shared knob direction, probability mixing, reachability."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dsnet
from dsnet.evaluation import evaluate
from dsnet.evaluation.reachability import reachable_choices, routing_reachability
from dsnet.layers.gate import bias_ramp, cost_direction
from dsnet.train.gate import (
    GateObjective,
    calibrate_budget,
    freeze_backbone,
    gate_step,
    mixed_task_loss,
    with_gate_mode,
)
from tests.conftest import perturb, small_input

SIZE = (3, 28, 28)


def _model(router: str = "utility", gate_mode: str = "pre", seed: int = 0) -> dsnet.DynamicNet:
    torch.manual_seed(seed)
    model = dsnet.create_model("ds_resnet8_tiny", num_classes=4, router=router, gate_mode=gate_mode)
    return perturb(model, seed=seed)


def _strong_head(model: dsnet.DynamicNet, seed: int = 0, scale: float = 1.0) -> dsnet.DynamicNet:
    """A random routing head whose outputs spread over the choices (``scale`` 1: not saturating a sigmoid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if model.exit_head is None:
            w = model.gate.slim_head.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
        else:
            for p in model.exit_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * scale)
            model.exit_head.norm.running_var.fill_(0.05)
    return model.eval()


def _concave_utility_head(model: dsnet.DynamicNet, probs: list[float]) -> dsnet.DynamicNet:
    """Exit head that predicts ``probs`` for every image (weights zero, bias the logits), deterministically."""
    with torch.no_grad():
        model.exit_head.out.weight.zero_()
        model.exit_head.out.bias.copy_(torch.logit(torch.tensor(probs)))
    return model.eval()


def _brute_force_reachable(scores: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Reference: the argmax is constant between consecutive breakpoints, so test one b inside each piece."""
    s, d = scores.double(), direction.double()
    out = torch.zeros(s.shape, dtype=torch.bool)
    for i in range(s.shape[0]):
        cuts = sorted(
            float((s[i, k] - s[i, j]) / (d[j] - d[k])) for j in range(len(d)) for k in range(len(d)) if d[j] != d[k]
        )
        probes = [cuts[0] - 1.0, cuts[-1] + 1.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:]) if b > a]
        for b in probes:
            out[i, int((s[i] + b * d).argmax())] = True
    return out


def test_reachability_is_exact():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 5, generator=g)
    for direction in (
        bias_ramp(5),
        cost_direction(torch.tensor([1.0, 1.7, 2.1, 3.9, 4.0])),
        torch.randn(5, generator=g),
    ):
        assert torch.equal(reachable_choices(scores, direction), _brute_force_reachable(scores, direction))
    # hand-made hull: the middle point lies below the chord between its neighbours -> unreachable
    d = torch.tensor([1.0, 0.0, -1.0])
    assert reachable_choices(torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.5, 0.0]]), d).tolist() == [
        [True, False, True],
        [True, True, True],
    ]
    # equal directions: the bias never separates them, the higher score (first on a tie) takes them all
    flat = torch.zeros(3)
    assert reachable_choices(torch.tensor([[0.2, 0.5, 0.5]]), flat).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="scores must be"):
        reachable_choices(torch.zeros(2, 3), torch.zeros(4))


def test_logits_router_is_unchanged():
    model = _strong_head(_model(router="logits"))
    x = small_input(model, 12, size=28, seed=1)
    assert model.router == "logits" and torch.equal(model.bias_direction(SIZE), bias_ramp(len(model.routing_space)))
    with torch.no_grad():
        h, z = model.forward_pre(x, model.routing_space[0])
        raw, _ = model.raw_gate_logits(h, z)
        assert torch.equal(model.gate_scores(h, z)[0], raw)
        r = model(x, return_routing=True, gate_bias=0.3 * bias_ramp(4))
    torch.testing.assert_close(r.gate_logits, raw + 0.3 * bias_ramp(4))
    assert torch.equal(r.choice, (raw + 0.3 * bias_ramp(4)).argmax(1))
    with pytest.raises(ValueError, match="router must be one of logits, utility"):
        dsnet.create_model("ds_resnet8_tiny", router="confidence")


@pytest.mark.parametrize("gate_mode", ["pre", "exit"])
def test_utility_knob_is_lam_times_relative_cost(gate_mode):
    model = _strong_head(_model(gate_mode=gate_mode))
    x = small_input(model, 16, size=28, seed=2)
    macs = model.routing_macs(SIZE)
    c = macs / macs.max()
    direction = model.bias_direction(SIZE)
    torch.testing.assert_close(direction, -(c - c.mean()))
    with torch.no_grad():
        h, z = model.forward_pre(x, model.routing_space[0])
        p = torch.sigmoid(model.raw_gate_logits(h, z)[0])
        for lam in (-0.2, 0.0, 0.15, 0.4, 2.0):
            r = model(x, return_routing=True, gate_bias=lam * direction)
            torch.testing.assert_close(r.gate_logits, p + lam * direction)  # probabilities, bias in accuracy units
            assert torch.equal(r.choice, (p - lam * c).argmax(1))
            assert torch.equal(r.subnet, torch.tensor(model.routing_space)[r.choice])
    # training mode: no Gumbel noise for the utility router, the argmax of the scores
    model.train()
    freeze_backbone(model)
    with torch.no_grad():
        p = torch.sigmoid(model.raw_gate_logits(*model.forward_pre(x, model.routing_space[0]))[0])  # exit: batch BN
        r = model(x, return_routing=True)
    assert torch.equal(r.choice, p.argmax(1)) and torch.equal(r.gate_onehot.argmax(1), r.choice)


def test_every_choice_reachable_with_a_concave_utility_head():
    """A head that predicts a concave accuracy-per-compute curve makes every width a knob setting."""
    model = _concave_utility_head(_model(gate_mode="exit"), [0.5, 0.75, 0.87, 0.92])
    x = small_input(model, 24, size=28, seed=3)
    loader = DataLoader(TensorDataset(x, torch.arange(24) % 4), batch_size=8)
    summary = routing_reachability(model, loader)
    assert summary["router"] == "utility" and summary["reachable_fraction"] == [1.0, 1.0, 1.0, 1.0]
    # ... and the knob reaches each one: one lam per choice
    seen = set()
    with torch.no_grad():
        for lam in torch.linspace(-0.5, 2.0, 60).tolist():
            seen |= set(model(x, return_routing=True, gate_bias=lam * model.bias_direction(SIZE)).choice.tolist())
    assert seen == {0, 1, 2, 3}
    # the same model with the logits rule on SGS-like log-prior logits reaches the two ends only
    logits = _concave_utility_head(_model(router="logits", gate_mode="exit"), [0.82, 0.01, 0.01, 0.17])
    with torch.no_grad():
        logits.exit_head.out.bias.copy_(torch.log(torch.tensor([0.82, 0.01, 0.01, 0.17])))
    assert routing_reachability(logits, loader)["reachable_fraction"] == [1.0, 0.0, 0.0, 1.0]


def _grouped_data(model: dsnet.DynamicNet, n: int = 96, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in four brightness groups; group g is labelled with what routing choice g predicts.

    Choice g is then right on its group (and so is any choice that agrees with it), so per image the best
    choice differs by group, and a head that tells the groups apart learns to use every width.
    """
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(n) % 4
    x = torch.randn(n, *SIZE, generator=g) * 0.3 + (group.float() * 1.5 - 2.25)[:, None, None, None]
    with torch.no_grad():
        h, _ = model.forward_pre(x, model.routing_space[0])
        preds = torch.stack([model.forward_post(h, k).argmax(1) for k in model.routing_space], 1)
    return x, preds[torch.arange(n), group]


def test_gate_step_trains_the_utility_head_to_use_every_width():
    model = _model(gate_mode="exit", seed=1)
    x, y = _grouped_data(model, n=48)
    model.train()
    head = freeze_backbone(model)
    head_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head_names and all(n.startswith("exit_head.") for n in head_names)
    opt = torch.optim.Adam(head, lr=0.05)
    table = model.routing_macs(SIZE)
    objective = GateObjective()
    losses = []
    for _ in range(50):
        opt.zero_grad(set_to_none=True)
        stats = gate_step(model, x, y, table, objective, unit_macs=1e6)
        opt.step()
        losses.append(stats["loss_utility"])
    assert stats["loss"] == stats["loss_utility"] and stats["loss_sgs"] == stats["loss_task"] == 0.0
    assert losses[-1] < 0.5 * losses[0]
    summary = routing_reachability(model, DataLoader(TensorDataset(x, y), batch_size=32))
    assert all(f > 0 for f in summary["reachable_fraction"]), summary


@pytest.mark.parametrize("gate_mode", ["pre", "exit"])
def test_utility_step_is_binary_cross_entropy_of_correctness(gate_mode):
    model = _strong_head(_model(gate_mode=gate_mode))
    x, y = small_input(model, 16, size=28, seed=5), torch.arange(16) % 4
    model.train()
    head = freeze_backbone(model)
    stats = [gate_step(model, x, y, model.routing_macs(SIZE), GateObjective(), unit_macs=1e6) for _ in range(2)]
    assert stats[0] == stats[1]  # no Gumbel noise: the same batch gives the same loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head if p.dim() > 1)
    with torch.no_grad():
        h, z = model.forward_pre(x, model.routing_space[0])
        outs = [model.forward_post(h, k) for k in model.routing_space]
        correct = torch.stack([o.argmax(1) == y for o in outs], 1).float()
        u, _ = model.raw_gate_logits(h, z, slim_out=outs[0])
    expected = F.binary_cross_entropy_with_logits(u, correct)
    assert stats[0]["loss_utility"] == pytest.approx(float(expected), rel=1e-5)


def test_mixed_task_loss_is_nll_of_the_mixed_probabilities():
    torch.manual_seed(0)
    outs = torch.randn(6, 4, 5) * 3  # (samples, choices, classes)
    labels = torch.randint(0, 5, (6,))
    choice = torch.tensor([0, 1, 2, 3, 1, 0])
    onehot = F.one_hot(choice, 4).float().requires_grad_(True)
    loss = mixed_task_loss(onehot, outs, labels)
    chosen = outs[torch.arange(6), choice]
    torch.testing.assert_close(loss, F.cross_entropy(chosen, labels))  # forward: the chosen output's NLL
    (grad,) = torch.autograd.grad(loss, onehot)
    p_label = torch.softmax(outs, -1)[torch.arange(6), :, labels]  # (samples, choices)
    # d/dm_j -log(sum_k m_k p_k) = -p_j / p_chosen: a choice likelier to be right gets a more negative gradient
    torch.testing.assert_close(grad, -p_label / p_label[torch.arange(6), choice][:, None] / 6)
    # not the old mixture of logits, whose gradient follows the logits' scale
    logit_mix = F.cross_entropy((onehot[:, :, None] * outs).sum(1), labels)
    (old,) = torch.autograd.grad(logit_mix, onehot)
    assert not torch.allclose(grad, old)
    # gate_step's task loss with task_loss="mixed" is exactly this, at the same Gumbel draw
    model = _strong_head(_model(router="logits"))
    model.train()
    freeze_backbone(model)
    x, y = small_input(model, 12, size=28, seed=6), torch.arange(12) % 4
    torch.manual_seed(7)
    stats = gate_step(model, x, y, model.routing_macs(SIZE), GateObjective(task_loss="mixed"), unit_macs=1e6)
    torch.manual_seed(7)
    with torch.no_grad():
        h, z = model.forward_pre(x, model.routing_space[0])
        outs = torch.stack([model.forward_post(h, k) for k in model.routing_space], 1)
        onehot = F.gumbel_softmax(model.raw_gate_logits(h, z)[0].float(), tau=1.0, hard=True)
    chosen = outs[torch.arange(12), onehot.argmax(1)]
    assert stats["loss_task"] == pytest.approx(float(F.cross_entropy(chosen, y)), rel=1e-5)


@pytest.mark.parametrize("gate_mode", ["pre", "exit"])
def test_calibrate_budget_meets_a_budget_with_the_utility_router(gate_mode):
    model = _strong_head(_model(gate_mode=gate_mode))
    loader = [(small_input(model, 32, size=28, seed=10 + i), None) for i in range(2)]
    table = model.routing_macs(SIZE)
    target = float(0.4 * table[0] + 0.6 * table[-1])
    lam = calibrate_budget(model, loader, target_macs=target)
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        routed = model(x, return_routing=True)
        h, z = model.forward_pre(x, model.routing_space[0])
        p = torch.sigmoid(model.raw_gate_logits(h, z)[0])
    mean = float(table[routed.choice].mean())
    assert mean <= target  # met ...
    assert mean >= target - 2 * float(table[-1] - table[0]) / len(x)  # ... as tightly as the sample allows
    torch.testing.assert_close(model.gate.budget_bias, lam * model.bias_direction(SIZE))
    c = table / table.max()
    assert torch.equal(routed.choice, (p + model.gate.budget_bias).argmax(1))
    # ... which is argmax p - lam * c (the bisection ends at a tie: one sample may round the other way)
    assert int((routed.choice != (p - lam * c).argmax(1)).sum()) <= 1


def test_evaluation_reports_reachability_and_sweeps_along_the_direction(capsys):
    from dsnet.evaluation.text import format_summary

    model = _strong_head(_model())
    x, y = small_input(model, 48, size=28, seed=8), torch.arange(48) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    report = evaluate(model, loader, biases=[-0.3, 0.2, 0.6], progress=False)
    json.dumps(report)
    direction = model.bias_direction(SIZE)
    assert report["bias_ramp"] == pytest.approx(direction.tolist())
    assert report["routing"] == routing_reachability(model, loader)
    with torch.no_grad():
        for p in report["sweep"]:
            choice = model(x, return_routing=True, gate_bias=p["bias"] * direction).choice
            assert torch.bincount(choice, minlength=4).tolist() == p["histogram"]["counts"]
    assert "router 'utility': images each choice wins at some bias b" in format_summary(report)


def test_router_is_a_config_key_and_switches_the_supernet():
    from dsnet.train.config import ConfigError, resolve_config

    assert resolve_config({})["gate"]["router"] == "logits"
    assert resolve_config({"gate": {"router": "utility"}})["gate"]["router"] == "utility"
    with pytest.raises(ConfigError, match="gate.router: must be one of logits, utility"):
        resolve_config({"gate": {"router": "argmax"}})
    plain = _model(router="logits")
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 4, "router": "utility", "gate_mode": "exit"}}
    model = with_gate_mode(plain, spec, torch.device("cpu"))
    assert model.router == "utility" and model.gate_mode == "exit"
    x = small_input(model, 4, size=28)
    with torch.no_grad():
        torch.testing.assert_close(model(x, subnet=2), plain(x, subnet=2))


def test_route_reuses_the_routing_space_tensor():
    model = _model()
    a = model._routing_space_on(torch.device("cpu"))
    assert a is model._routing_space_on(torch.device("cpu")) and a.tolist() == model.routing_space
    with torch.inference_mode():
        r = model(small_input(model, 4, size=28), return_routing=True)
    assert not r.subnet.is_inference() or r.subnet.tolist()  # usable outside inference mode
    assert not model._routing_space_on(torch.device("cpu")).is_inference()


def test_onnx_bundle_follows_the_utility_rule(tmp_path):
    """Exit mode: the pre-gate graph holds the exit head and the sigmoid (the rule is the same in pre mode)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dsnet.export import OnnxDynamicModel, export_dynamic

    model = _strong_head(_model(gate_mode="exit"))
    calibrate_budget(model, [(small_input(model, 16, size=28, seed=12), None)], target_fraction=0.7)
    manifest = export_dynamic(model, tmp_path / "dyn.onnx", input_size=SIZE)
    meta = json.loads(manifest.read_text())
    assert meta["router"] == "utility" and meta["budget_bias_in_gate_logits"] is True
    assert meta["bias_direction"] == pytest.approx(model.bias_direction(SIZE).tolist())
    assert meta["budget_bias"] == pytest.approx(model.gate.budget_bias.tolist())
    bundle = OnnxDynamicModel(manifest)
    x = small_input(model, 16, size=28, seed=13)
    seen = set()
    for b in (-0.5, 0.0, 0.1, 0.3, 1.0):
        out, choice = bundle(x.numpy(), bias=b)
        with torch.inference_mode():
            eager = model(x, return_routing=True, gate_bias=b * model.bias_direction(SIZE))
        assert choice.tolist() == eager.choice.tolist()
        assert float(abs(out - eager.logits.numpy()).max()) < 1e-4
        seen |= set(choice.tolist())
    assert len(seen) > 1
    with pytest.raises(ValueError, match="not both"):
        bundle(x.numpy(), gate_bias=[0.0] * 4, bias=0.1)
