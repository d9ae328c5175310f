"""Dynamic inference (``model(x)``) at plain inference runs plain networks: the trunk before the gate and each
routed sub-network's part after it (``DynamicNet._route_plan``; the families' ``build_static_trunk`` /
``build_static_post``).

What it must keep: the same routing and outputs as the sliced layers, in both gate modes, for every family and for
a converted network; and, as ``model(x, subnet=k)``'s plans, every change of the weights or a hook seen on the next
call. Speed is measured in ``benchmarks/`` (``dsnet bench``'s grouped-static ratio), not here.
"""

import pytest
import torch
from torch import nn

import dsnet
from tests.conftest import perturb, small_input

MODELS = ["ds_resnet8_tiny", "ds_resnet20_cifar", "ds_mobilenet_v1_cifar", "ds_mbv2_tiny", "ds_vit_tiny"]


def _sliced_route(model, x, **kw):
    """Routing through the sliced layers: the same model with plans off (a bounded cache never builds one)."""
    model.set_inference_cache(max_bytes=1 << 40)
    try:
        with torch.inference_mode():
            return model(x, return_routing=True, **kw)
    finally:
        model.set_inference_cache()


def _route_entry(model):
    entry = model.__dict__["_plans"].get("route")
    return None if entry is None else entry[1]


def _check_route(model, x, **kw):
    model.set_inference_cache()
    with torch.inference_mode():
        first = model(x, return_routing=True, **kw)  # the sliced layers; the weights are remembered
        assert _route_entry(model) is None
        out = model(x, return_routing=True, **kw)  # the same weights again: the plan
        parts = _route_entry(model)
        assert parts is not None
        held = model.inference_cache_bytes()
    ref = _sliced_route(model, x, **kw)
    for got in (first, out):
        assert torch.equal(got.choice, ref.choice)
        torch.testing.assert_close(got.gate_logits, ref.gate_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    return ref, parts, held


@pytest.mark.parametrize("gate_mode", ["exit", "pre"])
@pytest.mark.parametrize("name", MODELS)
def test_routed_plan_equals_the_sliced_layers(name, gate_mode):
    model = perturb(dsnet.create_model(name, gate_mode=gate_mode)).eval()
    x = small_input(model, 12)
    ref = _check_route(model, x)[0]
    bias = -ref.gate_logits.mean(0)  # spread the batch over the choices
    ref, parts, held = _check_route(model, x, gate_bias=bias.tolist())
    assert len(set(ref.choice.tolist())) > 1
    assert len(parts.posts) == len(set(ref.choice.tolist()) | ({0} if gate_mode == "exit" else set()))
    assert not any(isinstance(m, dsnet.layers.sliced.SliceableModule) for net in parts.modules() for m in net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for net in parts.modules() for m in net.modules())  # folded
    assert held > 0  # the plain parts hold compact copies


def test_trunk_and_post_compose_to_the_extracted_network():
    model = perturb(dsnet.create_model("ds_mobilenet_v1_cifar")).eval()
    x = small_input(model, 3)
    with torch.no_grad():
        for k in model.routing_space:
            h, _ = model.forward_gate(model.build_static_trunk(k).eval()(x), k)
            out = model.build_static_post(k).eval()(h)
            torch.testing.assert_close(out, model.extract(k, fold_bn=False).eval()(x), rtol=1e-5, atol=1e-5)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.layer2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.mid(x))
        return self.fc(self.layer3(self.layer2(x)).mean((2, 3)))


def test_converted_network_routes_through_its_plain_parts():
    torch.manual_seed(0)
    net = _Residual()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(10, 1, 16, 16) * torch.linspace(0.3, 3, 10).view(-1, 1, 1, 1)
    dyn = dsnet.make_dynamic(net, x[:2], gate_after="layer2").eval()
    with torch.no_grad():
        dyn.exit_head.out.weight.normal_(0, 3.0)
    ref = _check_route(dyn, x)[0]
    ref = _check_route(dyn, x, gate_bias=(-ref.gate_logits.mean(0)).tolist())[0]
    assert len(set(ref.choice.tolist())) > 1


def test_routed_plan_sees_weight_changes_hooks_and_training():
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, 8)
    _check_route(model, x)
    with torch.no_grad():
        for bn in model.sliced_batchnorms():
            bn.running_var.add_(0.5)  # in eval mode, no mode switch: only the version counters tell
        after = model(x)
        again = model(x)
    ref = _sliced_route(model, x)
    torch.testing.assert_close(after, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref.logits, rtol=1e-5, atol=1e-5)
    seen = []
    handle = model.stem.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(x)
    assert seen == [model.subnets[model.routing_space[0]].widths[0]]  # the hooked layer ran itself
    handle.remove()
    out = model(x)  # gradients recorded: the sliced layers, with autograd
    assert out.requires_grad


def test_routed_plan_under_forced_routing_and_channels_last():
    model = perturb(dsnet.create_model("ds_mobilenet_v1_cifar")).eval().to(memory_format=torch.channels_last)
    x = small_input(model, 8).contiguous(memory_format=torch.channels_last)
    choices = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    with model.forced_routing(choices):
        ref, parts, _ = _check_route(model, x)
    assert ref.choice.tolist() == choices.tolist()
    conv = next(m for m in parts.trunk.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_model_built_inside_inference_mode_routes_through_its_plan():
    with torch.inference_mode():
        model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
        x = small_input(model, 6)
        first = model(x)
        second = model(x)
        assert _route_entry(model) is not None
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)
