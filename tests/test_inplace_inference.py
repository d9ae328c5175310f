"""dsnet's cached plans write residual sums and activations in place: the same values, fewer tensors.

``inplace_inference`` turns on ``StaticResidual.inplace`` (the shortcut added into the body's output, its ReLU in
place, when no gradient is recorded) and makes every activation that follows a convolution in-place; the plans of
``model(x, subnet=k)`` and dynamic inference are built with it, ``extract()`` is not. Speed: ``docs/benchmarks.md``;
here only the values and what must stay untouched.
"""

import pytest
import torch
from torch import nn

import dsnet
from dsnet.models.static import StaticResidual, inplace_inference
from tests.conftest import perturb, small_input


def _block(shortcut: nn.Module) -> StaticResidual:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    return StaticResidual(body, shortcut, nn.ReLU(), inplace=True).eval()


@pytest.mark.parametrize("shortcut", [nn.Identity(), nn.Conv2d(4, 4, 1)], ids=["identity", "conv"])
def test_residual_without_autograd_equals_with_it_and_leaves_its_input_alone(shortcut):
    block = _block(shortcut)
    x = torch.randn(2, 4, 6, 6)
    kept = x.clone()
    with torch.enable_grad():
        ref = block(x)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = block(x)
        assert torch.equal(out, ref)
        assert torch.equal(x, kept)  # the identity shortcut's tensor is the caller's: never written
    assert (ref == 0).any() and (ref > 0).any()  # the ReLU ran


class _View(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :]


@pytest.mark.parametrize("body", [nn.Sequential(), nn.Sequential(_View())], ids=["empty", "view"])
def test_a_body_that_hands_back_its_input_is_never_written(body):
    block = StaticResidual(body, nn.Identity(), nn.ReLU(), inplace=True).eval()
    x = torch.randn(2, 4, 6, 6)
    kept = x.clone()
    with torch.inference_mode():
        out = block(x)
    assert torch.equal(x, kept)
    assert torch.equal(out, torch.relu(2 * kept))


def test_residual_still_trains_and_keeps_dtype_promotion():
    block = _block(nn.Identity()).train()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    block(x).sum().backward()  # the out-of-place path under autograd
    assert x.grad is not None and block.body[0].weight.grad is not None
    with torch.no_grad():  # a body in another dtype than its shortcut: promoted as out-of-place addition does
        half = StaticResidual(nn.Sequential(nn.Conv2d(4, 4, 1).to(torch.float64)), nn.Identity(), nn.ReLU(), True)
        assert half(x.detach().to(torch.float64)).dtype == torch.float64
        mixed = StaticResidual(_Cast(torch.bfloat16), nn.Identity(), nn.ReLU(), inplace=True)
        assert mixed(x.detach()).dtype == torch.float32  # bf16 body + fp32 shortcut: fp32, not written into bf16


class _Cast(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def test_inplace_inference_changes_activations_only_after_a_fresh_output():
    relu = nn.ReLU()  # one module used twice: replaced per slot, never switched in place for both
    net = nn.Sequential(nn.Conv2d(3, 3, 1), relu, nn.Identity(), nn.ReLU(), nn.Sequential(relu, nn.Linear(3, 3)))
    assert inplace_inference(net) == 1
    assert net[1].inplace and net[1] is not relu and not relu.inplace
    assert not net[3].inplace  # after an Identity: its input is someone else's tensor
    assert not net[4][0].inplace  # first in its Sequential: its input is the caller's


def test_an_extracted_network_stays_out_of_place_so_hooks_keep_what_they_saw():
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    net = model.extract(model.routing_space[-1])
    blocks = [m for m in net.modules() if isinstance(m, StaticResidual)]
    assert blocks and not any(b.inplace for b in blocks)
    seen = []
    blocks[0].body[-1].register_forward_hook(lambda mod, inp, out: seen.append((out, out.clone())))
    with torch.inference_mode():
        net(small_input(model, 2))
    kept, copy = seen[0]
    assert torch.equal(kept, copy)  # not overwritten by the residual sum
    assert inplace_inference(net) >= len(blocks)  # the pass turns them on (what the plans run)
    assert all(b.inplace for b in blocks)


def test_extract_inplace_is_the_same_network_for_serving_and_timing():
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, 3)
    k = model.routing_space[0]
    plain, fast = model.extract(k), model.extract(k, inplace=True)
    assert all(m.inplace for m in fast.modules() if isinstance(m, StaticResidual))
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in fast.modules())
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in plain.modules())
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


@pytest.mark.parametrize("name", ["ds_resnet8_tiny", "ds_mobilenet_v1_cifar", "ds_mbv2_tiny"])
def test_plans_run_in_place_and_route_as_the_sliced_layers(name):
    model = perturb(dsnet.create_model(name)).eval()
    x = small_input(model, 5)
    kept = x.clone()
    k = model.routing_space[0]
    with torch.inference_mode():
        for _ in range(2):  # the second call builds and runs the plans
            dyn = model(x, return_routing=True)
            static = model(x, subnet=k)
        h, _ = model.forward_pre(x, k)
        ref = model.forward_post(h, k)
    assert torch.equal(x, kept)
    plan = model.__dict__["_plans"][k][1]
    assert any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)) and m.inplace for m in plan.modules())
    assert all(m.inplace for m in plan.modules() if isinstance(m, StaticResidual))
    torch.testing.assert_close(static, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the sliced layers for dynamic inference: a hook turns the plans off
        handle = model.register_forward_hook(lambda *a: None)
        try:
            sliced = model(x, return_routing=True)
        finally:
            handle.remove()
    assert torch.equal(dyn.choice, sliced.choice)
    torch.testing.assert_close(dyn.logits, sliced.logits, rtol=1e-5, atol=1e-5)
