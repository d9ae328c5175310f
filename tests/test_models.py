"""Every registered model: forward/backward per sub-network, extraction, routing, gate gradient, bad input."""

import pytest
import torch

import dsnet
from dsnet.layers import SliceableModule
from tests.conftest import perturb, sliced, small_input


def test_subnets_are_ordered_and_readable(model_name):
    model = dsnet.create_model(model_name)
    macs = model.subnet_macs()
    routed = [m for s, m in zip(model.subnets, macs) if s.routed]
    assert routed == sorted(routed) and len(set(routed)) == len(routed)
    assert all(model.subnets[k].routed for k in model.routing_space)
    assert "=" in str(model.subnets[0])


def test_forward_backward_every_subnet(model_name):
    torch.manual_seed(0)
    model = dsnet.create_model(model_name).train()
    x = small_input(model, batch=2)
    for k in range(len(model.subnets)):
        model.zero_grad()
        y = model(x, subnet=k)
        assert y.shape == (2, model.num_classes)
        y.logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_sliced_equals_extracted_every_subnet(model_name):
    model = perturb(dsnet.create_model(model_name)).eval()
    x = small_input(model, batch=3)
    with torch.no_grad():
        for k in range(len(model.subnets)):
            static = model.extract(k)
            assert not any(isinstance(m, SliceableModule) for m in static.modules())
            n_static = sum(p.numel() for p in static.parameters())
            assert n_static < sum(p.numel() for p in model.parameters()) or k == model.largest
            torch.testing.assert_close(sliced(model, x, k), static(x), rtol=0, atol=1e-5)


def test_batch_routing_equals_per_sample_routing(model_name):
    model = perturb(dsnet.create_model(model_name)).eval()
    x = small_input(model, batch=8, seed=1)
    with torch.no_grad():
        # centre the gate logits on this batch (a run-time bias) so samples spread over choices
        bias = -model(x, return_routing=True).gate_logits.mean(0)
        batch = model(x, return_routing=True, gate_bias=bias)
        singles = [model(x[i : i + 1], return_routing=True, gate_bias=bias) for i in range(len(x))]
    assert len(set(batch.subnet.tolist())) > 1, "perturbed gate should route to several sub-networks"
    assert batch.subnet.tolist() == [s.subnet.item() for s in singles]
    # batch 1 and batch 8 may use different oneDNN kernels: allow float32 summation-order noise
    torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]), rtol=1e-4, atol=1e-4)
    # each sample's output is exactly its sub-network's output
    for k in batch.subnet.unique().tolist():
        idx = (batch.subnet == k).nonzero().flatten()
        with torch.no_grad():
            torch.testing.assert_close(batch.logits[idx], model(x[idx], subnet=k), rtol=1e-4, atol=1e-4)


def test_eval_routing_is_deterministic_argmax(model_name):
    model = perturb(dsnet.create_model(model_name)).eval()
    x = small_input(model, batch=6)
    with torch.no_grad():
        a, b = model(x, return_routing=True), model(x, return_routing=True)
    assert torch.equal(a.subnet, b.subnet)
    assert torch.equal(a.choice, a.gate_logits.argmax(1))


@pytest.mark.parametrize("gate_mode", ["exit", "pre"])
def test_gate_gradient_flows_in_training(model_name, gate_mode):
    torch.manual_seed(0)
    model = dsnet.create_model(model_name, gate_mode=gate_mode).train()
    assert model.gate_mode == gate_mode
    x = small_input(model, batch=4)
    result = model(x, return_routing=True)
    assert result.gate_onehot is not None
    assert torch.equal(result.gate_onehot.sum(1), torch.ones(4))
    result.logits.pow(2).sum().backward()
    grads = [p.grad for p in model.routing_head().parameters() if p.dim() >= 2]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bn_statistics_of_one_width_untouched_by_another(model_name):
    model = dsnet.create_model(model_name).train()
    x = small_input(model, batch=4)
    k_trained, k_other = 0, model.routing_space[-1]
    slots_trained = set(model.slots(k_trained))
    untouched = [s for s in set(model.slots(k_other)) if s not in slots_trained]
    assert untouched, "the widest routed sub-network must own statistics the slimmest does not use"
    before = {id(bn): bn.running_mean.clone() for bn in model.sliced_batchnorms()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x, subnet=k_trained).sum().backward()
        opt.step()
    changed = False
    for bn in model.sliced_batchnorms():
        assert torch.equal(bn.running_mean[untouched], before[id(bn)][untouched])
        changed |= not torch.equal(bn.running_mean, before[id(bn)])
    assert changed


def test_gate_bias_shifts_routing_toward_slim(model_name):
    model = perturb(dsnet.create_model(model_name)).eval()
    x = small_input(model, batch=8)
    n = len(model.routing_space)
    with torch.no_grad():
        slim = model(x, gate_bias=[1e4] + [0.0] * (n - 1), return_routing=True)
    assert (slim.subnet == model.routing_space[0]).all()


def test_bad_inputs_get_clear_errors():
    model = dsnet.create_model("ds_resnet20_cifar")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D tensor|got a 3-D tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(IndexError, match="subnet index 9 out of range: this model has 5"):
        model(torch.randn(1, 3, 32, 32), subnet=9)
    with pytest.raises(IndexError, match="out of range"):
        model.extract(-1)
    with pytest.raises(ValueError, match="gate_bias needs one value per routing choice"):
        model(torch.randn(2, 3, 32, 32), gate_bias=[0.0])
    with pytest.raises(ValueError, match="routing_space must be distinct routed"):
        dsnet.create_model("ds_mobilenet_v1", routing_space=[12, 13, 14])


def test_grayscale_input_via_in_chans():
    model = dsnet.create_model("ds_mobilenet_v1_cifar", in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_configurable_routing_window():
    model = dsnet.create_model("ds_mobilenet_v1", routing_space=[4, 5, 6, 7], num_classes=10)
    assert model.routing_space == [4, 5, 6, 7] and model.gate.num_choices == 4


def test_basic_block_resnet_with_the_gate_before_stage_1():
    """An identity shortcut between a slim pre-gate stem and a wider routed stage pads (or cuts) channels."""
    model = perturb(dsnet.create_model("ds_resnet18", gate_stage=1, num_classes=10)).eval()
    x = small_input(model, batch=3)
    with torch.no_grad():
        for k in range(len(model.subnets)):
            torch.testing.assert_close(model(x, subnet=k), model.extract(k)(x), rtol=0, atol=1e-5)
        assert model(x).shape == (3, 10)


def test_inference_cache_follows_weight_updates():
    """Cached weight slices follow optimiser steps; mode switches and clear_inference_cache cover the rest."""
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, batch=2, size=28)
    k = model.routing_space[1]  # a sub-network with input-sliced (cached) weights

    def fresh() -> torch.Tensor:
        return model.extract(k).eval()(x)

    with torch.no_grad():
        model(x, subnet=k)  # fill the cache
    params = [p for p in model.parameters() if p.dim() > 1]
    for p in params:
        p.grad = torch.randn_like(p)
    torch.optim.SGD(params, lr=0.1).step()  # version counters move: the cache notices
    with torch.no_grad():
        torch.testing.assert_close(model(x, subnet=k), fresh())
    # a fused optimiser does not bump version counters; switching modes (the train/eval loop) clears the cache
    model.train()
    torch.optim.SGD(params, lr=0.1, fused=True).step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, subnet=k), fresh())
        for p in params:  # a .data write in eval mode: documented as invisible until clear_inference_cache()
            p.data.mul_(0.5)
        model.clear_inference_cache()
        torch.testing.assert_close(model(x, subnet=k), fresh())
