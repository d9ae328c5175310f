"""``model(x, subnet=k)`` at plain inference runs a cached extracted network (DynamicNet._static_plan).

What it must keep: the same outputs as the sliced layers, and every way the weights change (in place in eval mode,
``.to()``, ``load_state_dict``) or a module is watched (forward hooks) seen on the next call. Speed is measured in
``benchmarks/sliced_call_overhead.py``, not here.
"""

import pytest
import torch

import dsnet
from tests.conftest import perturb, small_input

MODELS = ["ds_resnet8_tiny", "ds_mobilenet_v1_cifar", "ds_mbv2_tiny", "ds_vit_tiny"]


def _layers(model, x, k):
    """The sliced layers' own answer (what the plan replaces)."""
    h, _ = model.forward_pre(x, k)
    return model.forward_post(h, k)


def _model(name):
    model = perturb(dsnet.create_model(name)).eval()
    return model, small_input(model, 3)


@pytest.mark.parametrize("name", MODELS)
def test_plan_equals_the_sliced_layers_and_is_cached(name):
    model, x = _model(name)
    model.clear_inference_cache()  # nothing left from perturb's calls
    for k in sorted({model.routing_space[0], model.routing_space[-1], model.largest}):
        with torch.inference_mode():
            first = model(x, subnet=k)  # the sliced layers; the weights are remembered
            assert model.__dict__["_plans"][k][1] is None
            out = model(x, subnet=k)  # the same weights again: the plan
            assert model.__dict__["_plans"][k][1] is not None
            ref = _layers(model, x, k)
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert model.inference_cache_bytes() > 0  # the plans hold compact copies
    model.clear_inference_cache()
    assert model.inference_cache_bytes() == 0


def test_weights_that_change_every_call_never_build_a_plan():
    """An EMA teacher is updated between its calls: extracting each time would cost more than it saves."""
    model, x = _model("ds_resnet8_tiny")
    k = model.largest
    with torch.no_grad():
        for _ in range(3):
            out = model(x, subnet=k)
            torch.testing.assert_close(out, _layers(model, x, k), rtol=1e-5, atol=1e-5)
            for p in model.parameters():
                p.mul_(0.99)
    assert model.__dict__["_plans"][k][1] is None


def test_plan_sees_in_place_updates_in_eval_mode():
    model, x = _model("ds_resnet8_tiny")
    k = model.routing_space[1]
    with torch.no_grad():
        model(x, subnet=k)
        before = model(x, subnet=k)
        assert model.__dict__["_plans"][k][1] is not None
        for p in model.parameters():
            p.mul_(1.1)  # no mode switch: only the version counters tell
        for bn in model.sliced_batchnorms():
            bn.running_var.add_(0.5)
        after = model(x, subnet=k)  # the stale plan is not used
        again = model(x, subnet=k)  # a new one is
        ref = _layers(model, x, k)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)


def test_plan_follows_to_dtype_and_memory_format():
    model, x = _model("ds_mobilenet_v1_cifar")
    k = model.routing_space[0]
    with torch.no_grad():
        model(x, subnet=k)
        model(x, subnet=k)
        model.to(torch.float64)
        model(x.double(), subnet=k)
        out = model(x.double(), subnet=k)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, _layers(model, x.double(), k))
        model.to(torch.float32).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        model(xc, subnet=k)
        torch.testing.assert_close(model(xc, subnet=k), _layers(model, xc, k), rtol=1e-5, atol=1e-5)
        plan = model.__dict__["_plans"][k][1]
        assert plan is not None and next(plan.parameters()).dtype == torch.float32
        conv = next(m for m in plan.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 3)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_load_state_dict_and_train_eval_drop_the_plan():
    model, x = _model("ds_resnet8_tiny")
    other = perturb(dsnet.create_model("ds_resnet8_tiny"), seed=5).eval()
    k = model.routing_space[2]
    with torch.inference_mode():
        model(x, subnet=k)
        model(x, subnet=k)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x, subnet=k), _layers(other, x, k), rtol=1e-5, atol=1e-5)


def test_hooks_training_grad_and_a_bounded_cache_run_the_sliced_layers():
    model, x = _model("ds_resnet8_tiny")
    k = model.routing_space[0]
    with torch.no_grad():
        model(x, subnet=k)
        model(x, subnet=k)  # a plan exists
        assert model.__dict__["_plans"][k][1] is not None
    seen = []
    handle = model.stem.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(x, subnet=k)
    assert seen == [model.subnets[k].widths[0]]  # the hooked layer ran itself
    handle.remove()
    with torch.no_grad():
        model(x, subnet=k)
    assert len(seen) == 1
    out = model(x, subnet=k)  # gradients recorded: the layers, with autograd
    assert out.requires_grad
    out.sum().backward()
    assert model.stem.weight.grad is not None
    model.set_inference_cache(max_bytes=1 << 30)  # a bounded cache keeps its own LRU order: no plans
    with torch.no_grad():
        model(x, subnet=k)
    assert len(model.__dict__["_plans"]) == 0


def test_model_built_inside_inference_mode_runs_its_plan():
    with torch.inference_mode():
        model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
        x = small_input(model, 2)
        k = model.routing_space[1]
        model(x, subnet=k)
        torch.testing.assert_close(model(x, subnet=k), _layers(model, x, k), rtol=1e-5, atol=1e-5)
        assert model.__dict__["_plans"][k][1] is not None
        for p in model.parameters():
            p.mul_(0.9)
        model.clear_inference_cache()  # inference tensors move no version counter: after writes, a clear
        model(x, subnet=k)
        torch.testing.assert_close(model(x, subnet=k), _layers(model, x, k), rtol=1e-5, atol=1e-5)


def test_plans_are_not_saved_or_copied():
    import copy
    import io

    model, x = _model("ds_resnet8_tiny")
    model.set_inference_cache()  # nothing cached by perturb's calls
    with torch.no_grad():
        model(x, subnet=0)
        model(x, subnet=0)
    assert model.__dict__["_plans"][0][1] is not None
    assert copy.deepcopy(model).__dict__["_plans"] == {}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.__dict__["_plans"] == {}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, subnet=0), model(x, subnet=0))
