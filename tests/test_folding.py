"""BatchNorm folding at inference, extract(fold_bn), inference_mode, autocast and the cache's memory bound."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import dsnet
from dsnet.layers import SlicedBatchNorm2d, SlicedConv2d
from dsnet.layers.sliced import conv_bn
from tests.conftest import perturb, sliced, small_input

SMALL = [
    n
    for n in dsnet.list_models(kind="supernet")
    if n in ("ds_resnet8_tiny", "ds_resnet20_cifar", "ds_mobilenet_v1_cifar", "ds_vit_cifar")
]
WITH_BN = [n for n in SMALL if n != "ds_vit_cifar"]


class _CountCalls(TorchFunctionMode):
    """Counts calls of the given torch functions (public torch-function override mechanism)."""

    def __init__(self, *funcs) -> None:
        super().__init__()
        self.funcs = funcs
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.funcs:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=rel * max(1.0, b.abs().max().item()))


def _unfolded(model, x, **kw):
    """The reference: the same model with its inference cache (and so folding) off."""
    model.set_inference_cache(enabled=False)
    try:
        with torch.no_grad():
            return model(x, **kw)
    finally:
        model.set_inference_cache()


@pytest.mark.parametrize("name", SMALL)
def test_folded_equals_unfolded_every_subnet_and_routing(name):
    model = perturb(dsnet.create_model(name)).eval()
    x = small_input(model, batch=6, seed=1)
    for k in range(len(model.subnets)):
        with torch.no_grad(), _CountCalls(F.batch_norm) as calls:
            folded = sliced(model, x, k)
        if name in WITH_BN:
            assert calls.count == 0  # every conv+BN pair ran as one convolution
        _close(folded, _unfolded(model, x, subnet=k))
    bias = -model(x, return_routing=True).gate_logits.mean(0).detach()
    with torch.no_grad():
        routed = model(x, return_routing=True, gate_bias=bias)
    assert len(set(routed.subnet.tolist())) > 1  # the batch really splits
    _close(routed.logits, _unfolded(model, x, gate_bias=bias))


@pytest.mark.parametrize("name", WITH_BN)
def test_extract_folds_bn_and_fold_bn_false_keeps_it(name):
    model = perturb(dsnet.create_model(name)).eval()
    x = small_input(model, batch=3)
    n_bn = len(model.sliced_batchnorms())
    for k in range(len(model.subnets)):
        folded, plain = model.extract(k), model.extract(k, fold_bn=False)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.bias is not None for c in convs)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == n_bn
        with torch.no_grad():
            ref = sliced(model, x, k)
            _close(folded(x), ref)
            _close(plain(x), ref)
    # the unfolded structure trains: batch statistics, running statistics move
    plain = model.extract(0, fold_bn=False).train()
    bn = next(m for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    plain(x).sum().backward()
    assert not torch.equal(before, bn.running_mean) and bn.weight.grad is not None
    with pytest.raises(TypeError, match="fold_bn"):
        model.extract(0, fold_bn="no")


def test_conv_bn_training_mode_is_unchanged():
    torch.manual_seed(0)
    conv, bn = SlicedConv2d(8, 12, 3), SlicedBatchNorm2d(12, num_slots=2)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(4, 6, 7, 7)
    y = conv_bn(conv, bn, x, 1, 10)
    y2 = bn2(conv2(x, 10), 1)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    (y * torch.arange(10.0)[:, None, None]).sum().backward()
    (y2 * torch.arange(10.0)[:, None, None]).sum().backward()
    torch.testing.assert_close(conv.weight.grad, conv2.weight.grad)
    torch.testing.assert_close(bn.weight.grad, bn2.weight.grad)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)
    assert bn.running_mean[0].abs().sum() == 0 and bn.running_mean[1].abs().sum() > 0  # slot 1 only
    # eval, no grad: folded (no batch_norm call), equal to the two layers; a hooked layer is not folded
    bn.eval()
    with torch.no_grad(), _CountCalls(F.batch_norm) as calls:
        folded = conv_bn(conv, bn, x, 1, 10)
        ref = bn(conv(x, 10), 1)
    assert calls.count == 1
    _close(folded, ref)
    handle = bn.register_forward_hook(lambda *_: None)
    with torch.no_grad(), _CountCalls(F.batch_norm) as calls:
        conv_bn(conv, bn, x, 1, 10)
    handle.remove()
    assert calls.count == 1


def test_folded_cache_follows_optimiser_step_and_load_state_dict():
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, batch=2, size=28)
    k = model.routing_space[1]
    with torch.no_grad():
        before = sliced(model, x, k)  # fill the cache
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    torch.optim.SGD(params, lr=0.1).step()  # no mode switch: only the version counters tell
    fresh = dsnet.create_model("ds_resnet8_tiny").eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        after = sliced(model, x, k)
        _close(after, sliced(fresh, x, k))
    assert not torch.allclose(after, before)
    other = perturb(dsnet.create_model("ds_resnet8_tiny"), seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        _close(sliced(model, x, k), sliced(other, x, k))


def test_inference_mode_construction_loading_and_to():
    ref = perturb(dsnet.create_model("ds_mobilenet_v1_cifar")).eval()
    other = perturb(dsnet.create_model("ds_mobilenet_v1_cifar"), seed=3).eval()
    x = small_input(ref, batch=3)
    k = ref.routing_space[1]
    with torch.no_grad():
        want, want_other, want_routed = sliced(ref, x, k), sliced(other, x, k), ref(x)
    with torch.inference_mode():
        model = dsnet.create_model("ds_mobilenet_v1_cifar").eval()
        model.load_state_dict(ref.state_dict())
        _close(sliced(model, x, k), want)
        _close(model(x), want_routed)
        model.load_state_dict(other.state_dict())  # copies into inference tensors: no version counter moves
        _close(sliced(model, x, k), want_other)
        model.to(torch.float64)
        _close(sliced(model, x.double(), k), want_other.double())
        model.to(torch.float32)
        _close(sliced(model, x, k), want_other)
    with torch.no_grad():  # outside inference_mode too
        _close(sliced(model, x, k), want_other)
    # a normal model moved and run inside inference_mode
    with torch.inference_mode():
        ref.to(torch.float64)
        _close(sliced(ref, x.double(), k), want.double())


def test_autocast_casts_once_per_dtype_and_width():
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, batch=2, size=28)
    with torch.no_grad():
        full = [sliced(model, x, k) for k in range(len(model.subnets))]
    fp32_bytes = model.inference_cache_bytes()

    def run() -> list[torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [sliced(model, x, k) for k in range(len(model.subnets))]

    first = run()
    grown = model.inference_cache_bytes()
    assert grown > fp32_bytes  # the bfloat16 copies are kept
    with _CountCalls(torch.Tensor.to) as casts:
        again = run()
    assert casts.count == 0  # no weight is cast again
    assert model.inference_cache_bytes() == grown
    for a, b, ref in zip(first, again, full):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.float(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_inference_cache_bytes_and_bound():
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, batch=2, size=28)
    with torch.no_grad():
        want = [sliced(model, x, k) for k in range(len(model.subnets))]
    unbounded = model.inference_cache_bytes()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < unbounded < 5 * params
    limit = unbounded // 3
    model.set_inference_cache(max_bytes=limit)
    for _ in range(2):
        with torch.no_grad():
            for k in range(len(model.subnets)):
                _close(sliced(model, x, k), want[k])
                assert model.inference_cache_bytes() <= limit
    clone = copy.deepcopy(model)  # the copy keeps its own bound (and consistent accounting)
    with torch.no_grad():
        for k in range(len(clone.subnets)):
            _close(sliced(clone, x, k), want[k])
            assert clone.inference_cache_bytes() <= limit
    model.set_inference_cache(enabled=False)
    with torch.no_grad():
        _close(sliced(model, x, 1), want[1])
    assert model.inference_cache_bytes() == 0
    model.set_inference_cache()
    with torch.no_grad():
        sliced(model, x, 1)
    assert model.inference_cache_bytes() > 0
    with pytest.raises(ValueError, match="max_bytes"):
        model.set_inference_cache(max_bytes=-1)


def test_converted_network_folds_conv_bn_pairs():
    from dsnet.convert import make_dynamic
    from tests.reference_nets import randomize
    from tests.test_convert import ResidualCNN, _images

    torch.manual_seed(3)
    dyn = make_dynamic(randomize(ResidualCNN()), _images(2), gate_after="layer2").eval()
    x = _images(4, seed=7)
    for k in range(len(dyn.subnets)):
        with torch.no_grad(), _CountCalls(F.batch_norm) as calls:
            folded = sliced(dyn, x, k)
        assert calls.count == 0
        _close(folded, _unfolded(dyn, x, subnet=k))
        static = dyn.extract(k)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in static.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in dyn.extract(k, fold_bn=False).modules())
        with torch.no_grad():
            _close(static(x), folded)
    assert dsnet.count_macs(static, x[:1].shape) == dsnet.count_macs(dyn, x[:1].shape, subnet=k)


class _WeightFormats(TorchFunctionMode):
    """Records, for each 4-D convolution weight seen, whether it is stored channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.formats: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self.formats.append(w.is_contiguous(memory_format=torch.channels_last))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["ds_resnet8_tiny", "ds_mobilenet_v1_cifar"])
def test_channels_last_model_keeps_its_cached_weights_channels_last(name):
    """A channels-last model's cached (sliced, folded) convolution weights stay channels-last: a contiguous copy
    would make every convolution of a channels-last input reorder its weight again on every call."""
    model = perturb(dsnet.create_model(name)).eval().to(memory_format=torch.channels_last)
    x = small_input(model, batch=3, seed=2).contiguous(memory_format=torch.channels_last)
    for k in (0, len(model.subnets) // 2):
        with torch.no_grad(), _WeightFormats() as seen:
            out = sliced(model, x, k)
            again = sliced(model, x, k)  # from the cache
        assert seen.formats and all(seen.formats), f"subnet {k}: a convolution got a weight that is not channels-last"
        torch.testing.assert_close(again, out, rtol=0, atol=0)
        _close(out, _unfolded(model, x, subnet=k))


def test_folded_hot_path_follows_every_source():
    """The per-call hot path of folded inference (one lookup, one stamp) sees each thing the fold depends on."""
    torch.manual_seed(0)
    conv, bn = SlicedConv2d(8, 12, 3), SlicedBatchNorm2d(12, num_slots=2)
    bn.eval()
    x = torch.randn(2, 6, 5, 5)

    def ref() -> torch.Tensor:
        return F.batch_norm(
            conv(x, 10).detach(),
            bn.running_mean[1, :10],
            bn.running_var[1, :10],
            bn.weight[:10],
            bn.bias[:10],
            False,
            0.0,
            bn.eps,
        )

    with torch.no_grad():
        conv_bn(conv, bn, x, 1, 10)  # fills the hot path
        for change in (
            lambda: bn.running_var.mul_(2.0),
            lambda: bn.running_mean.add_(0.5),
            lambda: bn.weight.mul_(-1.0),
            lambda: bn.bias.add_(1.0),
            lambda: conv.weight.mul_(0.5),
            lambda: setattr(conv, "weight", nn.Parameter(torch.randn_like(conv.weight))),
        ):
            change()
            _close(conv_bn(conv, bn, x, 1, 10), ref())
            _close(conv_bn(conv, bn, x, 1, 10), ref())  # and again, from the hot path
        with _CountCalls(F.batch_norm) as calls:
            conv_bn(conv, bn, x, 0, 12)  # another slot and width: its own entry
        assert calls.count == 0


class _AtSubnet(nn.Module):
    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, subnet=self.k)


def test_export_after_cached_eager_inference():
    """A model whose inference caches (and hot paths) are filled still traces: tracing never reads the stamps
    (data pointers do not exist on traced tensors)."""
    model = perturb(dsnet.create_model("ds_resnet8_tiny")).eval()
    x = small_input(model, batch=2, size=28)
    with torch.no_grad():
        eager = sliced(model, x, 1)
        sliced(model, x, 1)  # the hot path is filled
        traced = torch.export.export(_AtSubnet(model, 1), (x,)).module()(x)
    _close(traced, eager)
