"""``gate_mode="exit"``: the gate decides after the slimmest sub-network ran, and can stop there."""

import pytest
import torch

import dsnet
from dsnet.evaluation import evaluate
from tests.conftest import perturb, small_input

FAMILIES = ["ds_resnet8_tiny", "ds_mobilenet_v1_cifar", "ds_vit_cifar"]


def _exit_model(name: str, seed: int = 0) -> dsnet.DynamicNet:
    model = perturb(dsnet.create_model(name, gate_mode="exit"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a strong random head, so samples spread over the choices
        for p in model.exit_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        model.exit_head.norm.running_var.fill_(0.05)
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_exit_routing_equals_per_sample_and_each_choice_is_its_subnetwork(name):
    model = _exit_model(name)
    x = small_input(model, batch=12, seed=3)
    with torch.no_grad():
        bias = -model(x, return_routing=True).gate_logits.mean(0)
        batch = model(x, return_routing=True, gate_bias=bias)
        singles = [model(x[i : i + 1], return_routing=True, gate_bias=bias) for i in range(len(x))]
    assert len(set(batch.choice.tolist())) > 1
    assert batch.choice.tolist() == [s.choice.item() for s in singles]
    torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for k in batch.subnet.unique().tolist():  # choice 0 is the slimmest's own answer
            idx = (batch.subnet == k).nonzero().flatten()
            torch.testing.assert_close(batch.logits[idx], model(x[idx], subnet=k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_exit_costs_count_the_slimmest_for_everyone(name):
    model = _exit_model(name)
    size = tuple(small_input(model, batch=1).shape[1:])
    macs = model.subnet_macs(size)
    pre = model.pre_gate_macs(size)
    space = model.routing_space
    assert 0 < pre < macs[space[0]]
    head = model.gate_head_macs()
    expected = [macs[space[0]] + head] + [macs[space[0]] + macs[k] - pre + head for k in space[1:]]
    assert model.routing_macs(size).tolist() == pytest.approx(expected)
    x = small_input(model, batch=12, seed=3)
    with torch.no_grad():
        choice = model(x, return_routing=True).choice
    assert dsnet.count_macs(model, x).tolist() == [int(expected[j]) for j in choice.tolist()]


def test_exit_mode_evaluates_consistently_and_loads_supernet_weights():
    from torch.utils.data import DataLoader, TensorDataset

    from dsnet.train.gate import with_gate_mode

    plain = perturb(dsnet.create_model("ds_resnet8_tiny", num_classes=4))
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 4, "gate_mode": "exit"}}
    model = with_gate_mode(plain, spec, torch.device("cpu"))
    assert model.gate_mode == "exit"
    x = small_input(model, batch=40, size=28, seed=5)
    with torch.no_grad():
        for k in range(len(model.subnets)):  # the backbone is the supernet's
            torch.testing.assert_close(model(x, subnet=k), plain(x, subnet=k))
        model.exit_head.out.weight.normal_(0, 3.0)
    y = torch.arange(40) % 4
    report = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16), progress=False)
    assert report["gate_mode"] == "exit" and report["consistency"]["top1_mismatches"] == 0
    assert [c["macs"] for c in report["routing_choices"]] == [int(m) for m in model.routing_macs((3, 28, 28))]
    with pytest.raises(ValueError, match="gate_mode must be one of pre, exit"):
        dsnet.create_model("ds_resnet8_tiny", gate_mode="late")


def test_cpu_attention_is_counted():
    """FlopCounterMode has no CPU formula for scaled_dot_product_attention; dsnet counts it as on CUDA."""

    class Attend(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    b, h, length, d = 2, 4, 17, 32
    macs = dsnet.count_macs(Attend(), (b, h, length, d))
    assert macs == 2 * h * length * length * d  # q k^T and attn v, per sample
    vit = dsnet.create_model("ds_vit_small")
    table = vit.subnet_macs()
    assert table[-1] == pytest.approx(4.60e9, rel=0.01)  # DeiT-S: 4.24 G of linear layers + 0.36 G of attention


def test_set_gate_mode_switches_the_head_and_keeps_the_supernet():
    torch.manual_seed(0)
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, 4, size=28)
    with torch.no_grad():
        before = [model(x, subnet=k) for k in model.routing_space]
    model.set_gate_mode("exit")
    assert model.gate_mode == "exit" and model.routing_head() is model.exit_head
    assert model.routing_heads() == [model.gate.slim_head, model.exit_head]
    with torch.no_grad():
        after = [model(x, subnet=k) for k in model.routing_space]
        routed = model(x, return_routing=True)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert routed.gate_logits.shape == (4, len(model.routing_space))
    model.set_gate_mode("pre")
    assert model.exit_head is None and model.routing_head() is model.gate.slim_head
    with pytest.raises(ValueError, match="gate_mode must be one of"):
        model.set_gate_mode("post")


def test_a_checkpoint_whose_spec_lacks_gate_mode_loads_the_head_its_weights_hold(tmp_path):
    from dsnet.train.checkpoint import load_model
    from dsnet.utils.checkpoint import save_checkpoint

    model = _exit_model("ds_resnet8_tiny")
    x = small_input(model, 8, size=28)
    spec = {"name": "ds_resnet8_tiny", "kwargs": {}}  # as the Python API writes it when given no gate_mode
    for mode in ("exit", "pre"):
        model.set_gate_mode(mode)
        save_checkpoint(tmp_path / f"{mode}.ckpt", {"model": spec, "state_dict": model.state_dict()})
        loaded, _ = load_model(tmp_path / f"{mode}.ckpt")
        assert loaded.gate_mode == mode
        with torch.no_grad():
            want, got = model.eval()(x, return_routing=True), loaded(x, return_routing=True)
        assert torch.equal(want.choice, got.choice) and torch.equal(want.logits, got.logits)


# ---------------------------------------------------------------- the default gate
@pytest.mark.parametrize("name", FAMILIES + ["ds_mbv2_tiny"])
def test_the_default_is_the_exit_gate_and_the_paper_gate_is_selectable_by_name(name):
    model = dsnet.create_model(name)
    assert model.gate_mode == "exit" and model.exit_head is not None and len(model.routing_space) >= 2
    paper = dsnet.create_model(name, gate_mode="pre")
    assert paper.gate_mode == "pre" and paper.exit_head is None
    assert paper.state_dict().keys() == {k for k in model.state_dict() if not k.startswith("exit_head.")}
    one = dsnet.create_model(name, routing_space=[model.routing_space[0]])  # one choice: nothing to decide
    assert one.gate_mode == "pre" and one.exit_head is None
    with pytest.raises(ValueError, match="at least two routing choices"):
        dsnet.create_model(name, routing_space=[model.routing_space[0]], gate_mode="exit")


def test_building_the_exit_head_leaves_the_global_random_stream_as_it_was():
    """Stage I's sampling and shuffling draw the same numbers whichever head the model carries."""
    draws = []
    for mode in ("pre", "exit", "exit"):
        torch.manual_seed(3)
        model = dsnet.create_model("ds_resnet8_tiny", gate_mode=mode)
        draws.append((torch.rand(5), [p.detach().clone() for n, p in model.named_parameters() if "exit" not in n]))
    for rand, params in draws[1:]:
        assert torch.equal(rand, draws[0][0]) and all(torch.equal(a, b) for a, b in zip(params, draws[0][1]))
    torch.manual_seed(3)
    again = dsnet.create_model("ds_resnet8_tiny")
    torch.manual_seed(4)
    other = dsnet.create_model("ds_resnet8_tiny")
    assert torch.equal(again.exit_head.out.weight, model.exit_head.out.weight)  # reproducible per seed
    assert not torch.equal(other.exit_head.out.weight, model.exit_head.out.weight)


def test_a_training_batch_of_one_routes_with_the_running_statistics():
    model = perturb(dsnet.create_model("ds_resnet8_tiny"), seed=1).train()
    x = small_input(model, batch=1, seed=2)
    out = model(x, return_routing=True)  # BatchNorm1d alone would refuse one sample in training
    assert out.logits.shape == (1, model.num_classes) and torch.isfinite(out.gate_logits).all()
    model.eval()
    with torch.no_grad():
        h, z = model.forward_pre(x, model.routing_space[0])
        inputs = z, model.forward_post(h, model.routing_space[0])
        stats = model.exit_head.norm.running_mean.clone()
        assert torch.equal(model.exit_head(*inputs), model.exit_head.train()(*inputs))  # as in eval mode
        assert torch.equal(model.exit_head.norm.running_mean, stats)  # and one sample does not move them
