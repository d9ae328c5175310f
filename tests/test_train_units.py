"""Stage I/II building blocks: sandwich step, masked optimiser, EMA, SGS, losses, BN recalibration, config."""

import pytest
import torch

import dsnet
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.config import ConfigError, apply_overrides, resolve_config
from dsnet.train.ema import ModelEma
from dsnet.train.gate import GateObjective, freeze_backbone, gate_step
from dsnet.train.losses import cheapest_correct_targets, complexity_loss, sgs_targets, soft_cross_entropy
from dsnet.train.optim import MaskedSGD, cosine_lr
from dsnet.train.supernet import sample_subnets, supernet_step


def _model():
    torch.manual_seed(0)
    # no zero-initialised residual BN: every layer gets a gradient on the first step
    return dsnet.create_model("ds_resnet20_cifar", num_classes=4, zero_init_residual=False)


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_sandwich_sampling_is_deterministic_and_shaped():
    model = _model()
    picks = sample_subnets(model, step=7, seed=3, num_random=2)
    assert picks[0] == model.largest and picks[-1] == 0 and len(picks) == 4
    assert picks == sample_subnets(model, step=7, seed=3, num_random=2)
    assert all(model.subnets[k].routed and k > 0 for k in picks[1:-1])
    draws = {tuple(sample_subnets(model, s, 3, 2)) for s in range(30)}
    assert len(draws) > 1


def test_step_trains_every_sampled_width_and_leaves_untouched_channels_alone():
    model = _model().train()
    teacher = ModelEma(model, 0.9).module
    opt = MaskedSGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.1)
    x, y = _batch()
    conv = model.blocks[-1].conv1  # a routed layer; widths 32/64/96/128 output channels
    before = conv.weight.detach().clone()
    # no "largest" this step: sub-network 1 (64 channels) on labels, sub-network 0 (32) bootstrapped
    supernet_step(model, teacher, [x], y, [1, 0], distill="ib")
    opt.step()
    moved = (conv.weight - before).flatten(1).abs().sum(1)
    assert (moved[:32] > 0).all() and (moved[32:64] > 0).all(), "both sampled widths must be trained"
    assert (moved[64:] == 0).all(), "channels no sampled sub-network reached must not move (no weight decay)"
    buf = opt.state[conv.weight]["momentum_buffer"]
    assert buf[64:].abs().sum() == 0 and buf[:64].abs().sum() > 0
    # a second step keeps the untouched momentum at zero and the untouched weights fixed
    opt.zero_grad()
    supernet_step(model, teacher, [x], y, [1, 0], distill="ib")
    opt.step()
    assert torch.equal(conv.weight[64:], before[64:])


def test_masked_sgd_equals_sgd_when_everything_is_touched():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MaskedSGD([a], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)


def test_ema_teacher_update():
    model = _model()
    ema = ModelEma(model, decay=0.75, warmup=False)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.blocks[0].bn1.running_mean.add_(5.0)
        m0 = ema.module.blocks[0].bn1.running_mean.clone()
        model.blocks[0].bn1.num_batches_tracked.add_(3)
    ema.update(model)
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, 0.75 * p0[n] + 0.25 * (p0[n] + 1.0))
        assert not p.requires_grad
    # the teacher's BN statistics follow its weights: averaged like them (timm's EMA), not the student's copied
    bn, student_bn = ema.module.blocks[0].bn1, model.blocks[0].bn1
    torch.testing.assert_close(bn.running_mean, 0.75 * m0 + 0.25 * student_bn.running_mean)
    assert not torch.equal(bn.running_mean, student_bn.running_mean)
    assert torch.equal(bn.num_batches_tracked, student_bn.num_batches_tracked)  # integer buffers are copied
    copy = ModelEma(_model(), decay=0.75, warmup=False, buffers="copy")  # the old behaviour, kept to measure it
    copy.update(model)
    assert torch.equal(copy.module.blocks[0].bn1.running_mean, student_bn.running_mean)
    assert not ema.module.training
    warm = ModelEma(model, decay=0.997)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): follows the student at first
    warm.updates = 10_000
    assert warm.current_decay() == 0.997


def test_ieb_and_inplace_targets_run_and_differ_from_ib():
    x, y = _batch()
    grads = {}
    for mode in ("ib", "ieb", "inplace", "none"):
        model = _model().train()
        teacher = ModelEma(model, 0.9).module
        losses = supernet_step(model, teacher, [x], y, [model.largest, 2, 0], distill=mode)
        assert set(losses) == {"loss_largest", "loss_random1", "loss_smallest"}
        grads[mode] = model.blocks[-1].conv1.weight.grad[:32].clone()
    assert not torch.allclose(grads["ib"], grads["ieb"])  # the smallest's target differs


def test_mvco_students_see_the_other_view():
    model = _model().train()
    teacher = ModelEma(model, 0.9).module
    x, y = _batch()
    one = supernet_step(model, teacher, [x, x], y, [model.largest, 0])
    model.zero_grad()
    two = supernet_step(model, teacher, [x, torch.flip(x, dims=[3])], y, [model.largest, 0])
    assert one["loss_largest"] == pytest.approx(two["loss_largest"])
    assert one["loss_smallest"] != pytest.approx(two["loss_smallest"])


def test_sgs_targets_hand_made_case():
    labels = torch.tensor([0, 1, 2, 3])
    eye = torch.eye(4)
    slim = eye[[0, 0, 0, 1]]  # right, wrong, wrong, wrong
    wide = eye[[0, 1, 0, 0]]  # right, right, wrong, wrong
    # easy -> slimmest(0); needs width -> widest(3); hopeless -> slimmest(0); hopeless -> slimmest(0)
    assert sgs_targets(slim, wide, labels, num_choices=4).tolist() == [0, 3, 0, 0]


def test_soft_cross_entropy_and_complexity_loss():
    logits = torch.randn(3, 5)
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 2, 4]), 5).float()
    torch.testing.assert_close(
        soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, onehot.argmax(1))
    )
    macs = torch.tensor([1e9, 2e9, 3e9], requires_grad=True)
    assert complexity_loss(macs, 0.5, 1e9).item() == pytest.approx(0.5 * 4.0)
    assert complexity_loss(macs, 0.5, 1e9, target_macs=2e9).item() == pytest.approx(0.0)


@pytest.mark.parametrize("gate_mode", ["pre", "exit"])
@pytest.mark.parametrize("task_loss", ["mixed", "routed", "expected"])
def test_gate_step_trains_only_the_routing_head(gate_mode, task_loss):
    torch.manual_seed(0)
    model = dsnet.create_model("ds_resnet20_cifar", num_classes=4, zero_init_residual=False, gate_mode=gate_mode)
    model.train()
    head = freeze_backbone(model)
    head_names = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "exit_head." if gate_mode == "exit" else "_gate.slim_head."
    assert head_names and all(n.startswith(prefix) for n in head_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = [bn.running_mean.clone() for bn in model.sliced_batchnorms()]
    opt = MaskedSGD(head, lr=1.0, momentum=0.0, mask_untouched=False)
    x, y = _batch(16)
    objective = GateObjective(task_loss=task_loss, sgs_targets="cheapest")
    stats = gate_step(model, x, y, model.routing_macs((3, 32, 32)), objective, unit_macs=1e6)
    assert all(p.grad.abs().sum() > 0 for p in head if p.dim() > 1)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in head_names), n
    for bn, s in zip(model.sliced_batchnorms(), stats_before):
        assert torch.equal(bn.running_mean, s)  # BN stays in eval mode
    assert 0.0 <= stats["sgs_wide_frac"] <= 1.0 and stats["loss_macs"] > 0
    assert sum(stats[f"train_route_{k}"] for k in model.routing_space) == pytest.approx(1.0)


def test_mixed_task_loss_gives_every_choice_a_gradient():
    """The mixed task loss's forward is the chosen output; its gradient reaches every choice, not just the chosen."""
    torch.manual_seed(0)
    outs = torch.randn(6, 4, 5)  # (samples, choices, classes)
    labels = torch.randint(0, 5, (6,))
    choice = torch.randint(0, 4, (6,))
    onehot = torch.nn.functional.one_hot(choice, 4).float().requires_grad_(True)
    mixed_logits = (onehot[:, :, None] * outs).sum(1)
    chosen = outs[torch.arange(6), choice]
    torch.testing.assert_close(mixed_logits, chosen)  # forward: the chosen output exactly
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(mixed_logits, labels), onehot)
    # d loss / d m_j = <d CE / d logits, out_j> for every choice j: a choice whose output is better for the
    # label gets a more negative gradient, so the gate learns which width would have been better
    dce = (torch.softmax(chosen, 1) - torch.nn.functional.one_hot(labels, 5)) / 6
    torch.testing.assert_close(grad, torch.einsum("nc,njc->nj", dce, outs))
    assert (grad != 0).all()
    # the routed loss (chosen output times its one-hot entry) reaches the chosen entry only
    routed = torch.nn.functional.cross_entropy(chosen * onehot.gather(1, choice[:, None]), labels)
    (grad,) = torch.autograd.grad(routed, onehot)
    assert (grad.ne(0).sum(1) <= 1).all()


def test_cheapest_correct_targets():
    correct = torch.tensor([[True, True, True], [False, True, True], [False, False, True], [False, False, False]])
    assert cheapest_correct_targets(correct).tolist() == [0, 1, 2, 0]
    # with two choices it is exactly SGS
    labels = torch.tensor([0, 1, 2, 3])
    eye = torch.eye(4)
    slim, wide = eye[[0, 0, 0, 1]], eye[[0, 1, 0, 0]]
    both = torch.stack([slim.argmax(1) == labels, wide.argmax(1) == labels], dim=1)
    assert cheapest_correct_targets(both).mul(3).tolist() == sgs_targets(slim, wide, labels, 4).tolist()


def test_bn_recalibration_changes_only_statistics():
    model = _model().eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = [_batch(16) for _ in range(3)]
    calibrate_bn(model, loader, num_batches=3, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
    assert model.stem_bn.momentum == 0.1 and not model.training  # settings restored
    # the routed sub-networks share the stem's slot: its mean is the plain average of the batch means
    slot, width = model.slots(0)[0], model.subnets[0].widths[0]
    with torch.no_grad():
        expected = torch.stack([model.stem(b[0], width).mean((0, 2, 3)) for b in loader]).mean(0)
    torch.testing.assert_close(model.stem_bn.running_mean[slot, :width], expected)
    assert model.stem_bn.num_batches_tracked[slot] == 3 * len(model.routing_space)


def test_cosine_schedule_with_warmup():
    lrs = [cosine_lr(s, 100, 1.0, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="supernet.epoch: unknown key"):
        resolve_config({"supernet": {"epoch": 3}})
    with pytest.raises(ConfigError, match="supernet.epochs: expected int, got str"):
        resolve_config({"supernet": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="supernet.distill: must be one of ib, ieb, inplace, none"):
        resolve_config({"supernet": {"distill": "kd"}})
    with pytest.raises(ConfigError, match="modle: unknown key"):
        resolve_config({"modle": {}})
    with pytest.raises(ValueError, match="data.*batchsize"):
        resolve_config({"data": {"batchsize": 3}})
    cfg = resolve_config(apply_overrides({}, ["supernet.lr=0.5", "gate.target_mmacs=12", "supernet.mvco=true"]))
    assert cfg["supernet"]["lr"] == 0.5 and cfg["gate"]["target_mmacs"] == 12 and cfg["supernet"]["mvco"] is True
    assert isinstance(resolve_config({"supernet": {"lr": 1}})["supernet"]["lr"], float)


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from dsnet.train.config import load_config

    recipes = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        cfg = load_config(path)
        assert cfg["model"]["name"] in dsnet.list_models(), path


def test_budget_calibration_meets_the_target_on_training_images():
    from dsnet.train.gate import calibrate_budget

    model = _model().eval()
    with torch.no_grad():
        model.gate.slim_head.weight.normal_(0, 3.0)
    loader = [_batch(32) for _ in range(2)]
    table = model.routing_macs((3, 32, 32))
    target = 0.5 * float(table[0] + table[-1])
    b = calibrate_budget(model, loader, target_macs=target)
    x = torch.cat([xb for xb, _ in loader])
    with torch.no_grad():
        routed = model(x, return_routing=True)
    mean = float(table[routed.choice].mean())
    assert mean <= target  # the budget is met ...
    step = float(table[-1] - table[0]) / len(x)
    assert mean >= target - 2 * step  # ... as tightly as the sample count allows
    torch.testing.assert_close(model.gate.budget_bias, b * torch.linspace(1, -1, len(model.routing_space)))
    # the stored bias travels with the weights
    clone = dsnet.create_model("ds_resnet20_cifar", num_classes=4, zero_init_residual=False)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.gate.budget_bias, model.gate.budget_bias)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_weight_decay_on_normalisation_and_biases(optimizer):
    from dsnet.train.config import DEFAULTS
    from dsnet.train.supernet import build_optimizer

    model = _model()
    sc = {**DEFAULTS["supernet"], "optimizer": optimizer, "weight_decay": 0.05}
    opt = build_optimizer(list(model.parameters()), 0.1, sc)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.dim() > 1), name
    assert model.stem_bn.weight.dim() == 1 and id(model.stem_bn.weight) not in decay


def test_checkpoint_from_before_gate_buffers_loads():
    # checkpoints written before the gate's budget bias and attention gain existed still load, with the
    # defaults (zero bias, gain 1); a key missing for any other reason is still an error
    from dsnet.train.checkpoint import load_state_into

    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(("budget_bias", "attention_gain"))}
    fresh = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    fresh.gate.budget_bias.fill_(3.0)
    load_state_into(fresh, old, "old.ckpt")
    assert float(fresh.gate.attention_gain) == 1.0 and not fresh.gate.budget_bias.any()
    del old["classifier.weight"]
    with pytest.raises(ValueError, match=r"old.ckpt: .*1 missing \(classifier.weight\)"):
        load_state_into(fresh, old, "old.ckpt")
