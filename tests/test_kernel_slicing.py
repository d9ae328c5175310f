"""Kernel-size slicing: the centre-crop convolution, DS-MobileNetV2 (widths x kernels), MACs, training, routing."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.layers import SliceableModule, SlicedBatchNorm2d
from dsnet.layers.kernel import KernelSlicedConv2d, kernel_conv_bn
from dsnet.macs import count_macs
from dsnet.models import static as static_modules
from dsnet.models.base import explicit_subnets
from dsnet.train.api import fit_gate, fit_supernet
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.supernet import sample_subnets
from tests.conftest import perturb, sliced, small_input

TINY = "ds_mbv2_tiny"


def _crop(w: torch.Tensor, k: int) -> torch.Tensor:
    off = (w.shape[-1] - k) // 2
    return w[..., off : off + k, off : off + k]


def _conv(depthwise: bool, stride: int, transform: bool = False) -> KernelSlicedConv2d:
    torch.manual_seed(0)
    ch_in, ch_out = (8, 8) if depthwise else (8, 12)
    conv = KernelSlicedConv2d(ch_in, ch_out, (3, 5, 7), stride, depthwise=depthwise, bias=True, transform=transform)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_sliced_conv_equals_plain_conv_of_the_crop(depthwise, stride):
    conv = _conv(depthwise, stride)
    x = torch.randn(2, 5, 11, 11)  # a channel prefix (5 of 8) and an odd size, so padding and stride both matter
    out = None if depthwise else 6
    groups = 5 if depthwise else 1
    shapes = set()
    for k in (3, 5, 7):
        w = _crop(conv.weight[: 5 if depthwise else out, : 1 if depthwise else 5], k)
        ref = F.conv2d(x, w, conv.bias[: w.shape[0]], stride, (k - 1) // 2, 1, groups)
        torch.testing.assert_close(conv(x, out, k), ref)  # gradient-recording path
        with torch.no_grad():
            torch.testing.assert_close(conv(x, out, k), ref)  # cached inference path
            torch.testing.assert_close(conv(x, out, k), ref)  # ... served from the cache
            static = conv.to_static(5, out, k)
            assert type(static) is nn.Conv2d and static.kernel_size == (k, k)
            torch.testing.assert_close(static(x), ref)
        shapes.add(ref.shape)
    assert len(shapes) == 1  # every kernel choice gives the largest kernel's output shape
    with torch.no_grad():  # the full kernel is SlicedConv2d's own path
        torch.testing.assert_close(conv(x, out), conv(x, out, 7))
    with pytest.raises(ValueError, match="kernel sizes"):
        conv(x, out, 4)


@pytest.mark.parametrize("depthwise", [False, True])
def test_kernel_conv_bn_folds_the_crop(depthwise):
    conv = _conv(depthwise, 2)
    bn = SlicedBatchNorm2d(conv.out_channels, num_slots=2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    x = torch.randn(3, 8, 9, 9)
    out = None if depthwise else 10
    for k in (3, 5, 7):
        with torch.no_grad():
            folded = kernel_conv_bn(conv, bn, x, 1, out, k)
            ref = bn(F.conv2d(x, *_plain_args(conv, 8, out, k)), 1)
        torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)


def _plain_args(conv: KernelSlicedConv2d, in_ch: int, out: int | None, k: int) -> tuple:
    rows = in_ch if conv.depthwise else out
    w = _crop(conv.weight[:rows, : 1 if conv.depthwise else in_ch], k)
    return w, conv.bias[:rows], conv.stride, (k - 1) // 2, 1, in_ch if conv.depthwise else 1


def test_kernel_transformation_matrices():
    conv = _conv(True, 1, transform=True)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():  # at initialisation (identity matrices) the transform is the plain crop
        torch.testing.assert_close(conv(x, None, 3), F.conv2d(x, *_plain_args(conv, 8, None, 3)))
        for m in conv.transform_matrices():
            m.add_(torch.randn(m.shape) * 0.3)
    t75, t53 = conv.transform_7to5, conv.transform_5to3
    w5 = (_crop(conv.weight, 5).reshape(8, 1, 25) @ t75.T).reshape(8, 1, 5, 5)
    w3 = (_crop(w5, 3).reshape(8, 1, 9) @ t53.T).reshape(8, 1, 3, 3)
    for k, w in ((5, w5), (3, w3), (7, conv.weight)):
        ref = F.conv2d(x, w, conv.bias, 1, (k - 1) // 2, 1, 8)
        torch.testing.assert_close(conv(x, None, k), ref, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(conv(x, None, k), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(conv.to_static(8, None, k)(x), ref, rtol=1e-5, atol=1e-5)
    conv(x, None, 3).square().sum().backward()  # the 3x3 kernel trains both matrices and the stored 7x7
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in (t75, t53))
    assert conv.weight.grad[:, :, 0].abs().sum() == 0  # ... but not its outer ring
    # FlopCounterMode charges the convolution only, not the weight transform
    counter = FlopCounterMode(display=False)
    with counter:  # recording a gradient: the transform runs on every call
        conv(x, None, 3)
    assert counter.get_total_flops() == 2 * 2 * 8 * 9 * 9 * 9  # FLOPs = 2 x (batch x channels x pixels x 3x3)


def _tiny(**kwargs):
    return dsnet.create_model(TINY, in_chans=1, **kwargs)


def test_tiny_space_mixes_widths_and_kernels():
    model = _tiny()
    routed = [model.subnets[k] for k in model.routing_space]
    assert 4 <= len(routed) <= 6
    assert len({s.widths for s in routed}) < len(routed)  # some choices differ in kernel only
    assert len({s.kernels for s in routed}) > 1
    macs = model.subnet_macs()
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    assert model.subnets[0].kernels[model.gate_stage] == 3 and model.subnets[-1].kernels[model.gate_stage] == 7
    assert 1e6 <= macs[0] and macs[-1] <= 10e6
    assert "/7x7" in str(model.subnets[-1])
    # a width-only routing space on the same supernet, and the width-only control model
    only7 = _tiny(routing_kernels=[7])
    assert {only7.subnets[k].kernels[only7.gate_stage] for k in only7.routing_space} == {7}
    control = dsnet.create_model("ds_mbv2_tiny_width", in_chans=1)
    assert all(set(s.kernels) <= {1, 3} for s in control.subnets) and control.stage_kernels[3] == [3]
    c_macs = [control.subnet_macs()[k] for k in control.routing_space]
    r_macs = [macs[k] for k in model.routing_space]
    assert c_macs[0] == r_macs[0] and abs(c_macs[-1] / r_macs[-1] - 1) < 0.1  # the same MACs range


def test_existing_families_have_no_kernel_dimension():
    model = dsnet.create_model("ds_resnet8_tiny")
    assert model.stage_kernels is None and all(s.kernels is None for s in model.subnets)
    assert str(model.subnets[0]) == "#0 stem=16 layer1=16 layer2=16 layer3=32"
    with pytest.raises(ValueError, match="subnet_kernels needs subnet_widths"):
        dsnet.models.base.DynamicNet(("a", "b"), ((8,), (8,)), 1, 3, 10, (3, 8, 8), None, subnet_kernels=[[3, 3]])


def test_explicit_kernel_subnets_are_checked():
    model = _tiny()
    widths = [list(model.subnets[k].widths) for k in (0, 8)]
    kernels = [list(model.subnets[k].kernels) for k in (0, 8)]
    net = _tiny(subnet_widths=widths, subnet_kernels=kernels)
    assert [s.kernels for s in net.subnets] == [model.subnets[0].kernels, model.subnets[8].kernels]
    with pytest.raises(ValueError, match="do not offer"):
        _tiny(subnet_widths=widths, subnet_kernels=[kernels[0], [*kernels[1][:-2], 9, 1]])
    with pytest.raises(ValueError, match="distinct"):
        _tiny(subnet_widths=[widths[0], widths[0]], subnet_kernels=[kernels[0], kernels[0]])
    with pytest.raises(ValueError, match="smallest first"):
        _tiny(subnet_widths=widths[::-1], subnet_kernels=kernels[::-1])
    with pytest.raises(ValueError, match="before the gate"):  # this family's pre-gate stages offer one kernel
        explicit_subnets(("a", "b", "c"), [[8, 8, 8], [8, 8, 16]], 2, [8, 8, 16], [[3, 3, 3], [3, 5, 5]])
    # widths alone: the routed stages use their largest kernel
    alone = _tiny(subnet_widths=[widths[0]])
    assert alone.subnets[0].kernels == model.subnets[2].kernels and alone.subnets[0].widths == model.subnets[2].widths


def _only_static_modules(net: nn.Module) -> bool:
    allowed = {getattr(nn, n) for n in dir(nn) if isinstance(getattr(nn, n), type)}
    allowed |= {
        getattr(static_modules, n) for n in static_modules.__all__ if isinstance(getattr(static_modules, n), type)
    }
    return all(type(m) in allowed for m in net.modules())


@pytest.mark.parametrize("transform", [False, True])
def test_mixed_subnets_equal_their_extracted_networks(transform):
    model = _tiny(kernel_transform=transform)
    if transform:  # transformation matrices away from the identity, so a wrong one shows
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, KernelSlicedConv2d):
                    for t in m.transform_matrices():
                        t.add_(torch.randn(t.shape) * 0.2)
    model = perturb(model)
    x = small_input(model, batch=3, size=28)
    with torch.no_grad():
        for k, net in enumerate(model.subnets):
            for fold in (True, False):
                static = model.extract(k, fold_bn=fold).eval()
                assert not any(isinstance(m, SliceableModule) for m in static.modules())
                assert _only_static_modules(static)
                torch.testing.assert_close(sliced(model, x, k), static(x), rtol=0, atol=1e-5)
            depthwise = [m for m in static.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
            routed_k = {m.kernel_size[0] for m in depthwise[-4:]}  # the routed stages' four blocks
            assert routed_k == {net.kernels[model.gate_stage]}
            assert all(m.padding[0] == (m.kernel_size[0] - 1) // 2 for m in depthwise)


def test_bn_statistics_are_private_per_kernel():
    model = _tiny()
    same_width = [s.index for s in model.subnets if s.widths == model.subnets[0].widths]
    assert len(same_width) == 3
    slots = {model.slots(k)[model.gate_stage] for k in same_width}
    assert len(slots) == 3  # 3x3, 5x5 and 7x7 at one width: three statistics slots
    assert len({model.slots(k)[model.gate_stage - 1] for k in same_width}) == 1  # the pre-gate part shares its slot
    bn = model.blocks[-1].bn1
    before = bn.running_mean.clone()
    model.train()
    with torch.no_grad():
        model(small_input(model, batch=4, size=28), subnet=same_width[0])
    changed = (bn.running_mean != before).any(1).nonzero().flatten().tolist()
    assert changed == [model.slots(same_width[0])[-2]]


def test_batched_routing_equals_per_sample_routing():
    model = perturb(_tiny(), seed=3)
    x = small_input(model, batch=16, size=28, seed=1)
    with torch.no_grad():
        bias = -model(x, return_routing=True).gate_logits.mean(0)
        batch = model(x, return_routing=True, gate_bias=bias)
        singles = [model(x[i : i + 1], return_routing=True, gate_bias=bias) for i in range(len(x))]
    chosen = set(batch.subnet.tolist())
    assert len(chosen) > 2
    assert len({model.subnets[k].kernels for k in chosen}) > 1  # the batch splits over kernel choices
    assert batch.subnet.tolist() == [s.subnet.item() for s in singles]
    torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]), rtol=1e-4, atol=1e-4)
    for k in chosen:
        idx = (batch.subnet == k).nonzero().flatten()
        with torch.no_grad():
            torch.testing.assert_close(batch.logits[idx], model(x[idx], subnet=k), rtol=1e-4, atol=1e-4)


def test_macs_count_the_cropped_kernels():
    model = perturb(_tiny())
    macs = model.subnet_macs()
    size = model.default_input_size
    for k in range(len(model.subnets)):
        assert macs[k] == count_macs(model.extract(k), (1, *size))
        assert macs[k] == count_macs(model.extract(k, fold_bn=False), (1, *size))
    by_width: dict[tuple, dict[int, int]] = {}
    for s in model.subnets:
        by_width.setdefault(s.widths, {})[s.kernels[model.gate_stage]] = macs[s.index]
    for widths, per_kernel in by_width.items():
        assert per_kernel[3] < per_kernel[5] < per_kernel[7]
        # exactly the depthwise difference: channels x output pixels x (7x7 - 3x3) per routed block, with the
        # channels and pixels read off the extracted network's depthwise convolutions
        net = next(s for s in model.subnets if s.widths == widths)
        static = model.extract(net.index)
        seen = []
        hooks = [
            m.register_forward_hook(lambda m, i, o, seen=seen: seen.append(m.out_channels * o.shape[-2] * o.shape[-1]))
            for m in static.modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1
        ]
        with torch.no_grad():
            static(torch.zeros(1, *size))
        for h in hooks:
            h.remove()
        assert per_kernel[7] - per_kernel[3] == sum(seen[-4:]) * (49 - 9)


def test_sandwich_sampling_covers_kernel_choices():
    model = _tiny()
    draws = [sample_subnets(model, step, seed=0, num_random=2) for step in range(40)]
    assert all(d[0] == model.largest and d[-1] == 0 for d in draws)
    largest, smallest = model.subnets[model.largest], model.subnets[0]
    assert largest.widths == tuple(max(w) for w in model.stage_widths)
    assert largest.kernels[model.gate_stage] == 7 and smallest.kernels[model.gate_stage] == 3
    assert smallest.widths == tuple(min(w) for w in model.stage_widths)
    randoms = {model.subnets[k] for d in draws for k in d[1:-1]}
    assert {s.kernels[model.gate_stage] for s in randoms} == {3, 5, 7}
    assert len({s.widths for s in randoms}) == 3


def test_end_to_end_supernet_and_gate_on_synthetic_data():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        labels = torch.randint(0, 10, (16,), generator=g)
        images = torch.randn(16, 1, 28, 28, generator=g) * 0.3 + labels[:, None, None, None] / 5.0
        batches.append((images, labels))
    model = _tiny(kernel_transform=True)
    matrix = model.blocks[-1].dw.transform_5to3.detach().clone()
    history = fit_supernet(model, batches, epochs=1, lr=0.05, progress=False)
    assert history and all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    assert not torch.equal(matrix, model.blocks[-1].dw.transform_5to3)  # the transformation matrices trained
    calibrate_bn(model, batches, num_batches=2, progress=False)
    head = [p.detach().clone() for p in model.routing_head().parameters()]  # the exit head by default
    fit_gate(model, batches, epochs=1, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(head, model.routing_head().parameters()))
    x = batches[0][0]
    with torch.no_grad():
        for j, k in enumerate(model.routing_space):  # the gate can select every choice (a bias on it)
            bias = torch.zeros(len(model.routing_space))
            bias[j] = 1e4
            routed = model(x, return_routing=True, gate_bias=bias)
            assert set(routed.choice.tolist()) == {j} and set(routed.subnet.tolist()) == {k}
            torch.testing.assert_close(routed.logits, model(x, subnet=k))
        assert torch.isfinite(model(x, return_routing=True).gate_logits).all()


SYNTHETIC = [
    "data.dataset=synthetic",
    "data.synthetic.num_train=128",
    "data.synthetic.num_val=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=28",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.workers=0",
    "supernet.epochs=1",
    "supernet.warmup_epochs=0",
    "supernet.bn_calibration_batches=2",
    "gate.epochs=1",
    "log.progress=false",
    "log.tensorboard=false",
]


def test_cli_trains_gates_and_evaluates_the_kernel_family(tmp_path, capsys):
    from dsnet.cli import main
    from dsnet.train.checkpoint import load_model

    sets = [a for kv in [f"model.name={TINY}", "model.kwargs.kernel_choices=[3,7]", *SYNTHETIC] for a in ("--set", kv)]
    assert main(["train", "supernet", *sets, "--out", str(tmp_path / "sup")]) == 0
    gate = tmp_path / "gate"
    assert main(["train", "gate", *sets, "--supernet", str(tmp_path / "sup" / "best.ckpt"), "--out", str(gate)]) == 0
    model, _ = load_model(gate / "best.ckpt")
    assert [s.kernels[3] for s in model.subnets] == [3, 7, 3, 7, 3, 7] and len(model.routing_space) == 6
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(gate / "best.ckpt"), "--json", str(report), "--no-progress"]) == 0
    static = json.loads(report.read_text())["static"]
    assert [s["kernels"]["s3"] for s in static] == [3, 7, 3, 7, 3, 7]
    assert static[0]["widths"] == static[1]["widths"] and static[0]["macs"] < static[1]["macs"]


def test_networks_trained_alone_keep_their_kernels():
    from dsnet.baselines.alone import alone_config, alone_kernels, alone_widths
    from dsnet.train.supernet import build_model

    cfg = {"model": {"name": TINY, "kwargs": {"routing_kernels": [3, 7]}, "checkpoint_path": None}, "supernet": {}}
    widths, kernels = alone_widths(cfg, 10, 1), alone_kernels(cfg, 10, 1)
    assert len(widths) == 6 and widths[0] == widths[1] and kernels[0] != kernels[1]
    nets = [build_model(alone_config(cfg, w, k), 10, 1) for w, k in zip(widths, kernels)]
    assert [n.subnets[0].kernels for n in nets] == [tuple(k) for k in kernels]
    assert [list(n.subnets[0].widths) for n in nets] == widths
    # the other families: no kernels, the config as before
    plain = {"model": {"name": "ds_resnet8_tiny", "kwargs": {}, "checkpoint_path": None}, "supernet": {}}
    assert alone_kernels(plain, 10, 1) == [None] * 4
    assert "subnet_kernels" not in alone_config(plain, alone_widths(plain, 10, 1)[0])["model"]["kwargs"]


def test_inference_folds_every_batchnorm_of_every_kernel_choice():
    from torch.overrides import TorchFunctionMode

    class CountBatchNorm(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.batch_norm:
                self.count += 1
            return func(*args, **(kwargs or {}))

    model = perturb(_tiny())
    x = small_input(model, batch=4, size=28)
    for k in range(len(model.subnets)):
        with torch.no_grad(), CountBatchNorm() as calls:
            folded = model(x, subnet=k)
        assert calls.count == 0  # every conv+BN pair, cropped depthwise ones included, ran as one convolution
        model.set_inference_cache(enabled=False)
        with torch.no_grad():
            torch.testing.assert_close(folded, model(x, subnet=k), rtol=1e-5, atol=1e-5)
        model.set_inference_cache()
