"""make_dynamic: plain CNNs written here become dynamic nets equal to them at full width, with the DynamicNet API."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dsnet
from dsnet.convert import make_dynamic, reorder_channels
from dsnet.layers import SliceableModule
from dsnet.models.pretrained import load_pretrained
from tests.conftest import sliced
from tests.reference_nets import TVBasicBlock, TVResNet, randomize


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResidualCNN(nn.Module):
    """A custom residual CNN: stem, three stages, residual adds, projection shortcuts, pooled classifier."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(Block(16, 16, 1), Block(16, 16, 1))
        self.layer2 = Block(16, 32, 2)
        self.layer3 = Block(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatCNN(nn.Module):
    """Two branches concatenated, BN + depthwise conv + squeeze-excitation on the concatenation,
    a second concatenation across resolutions, a flattened (not pooled) two-layer classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 1)
        self.bn_cat = nn.BatchNorm2d(40)
        self.dw = nn.Conv2d(40, 40, 3, padding=1, groups=40, bias=False)
        self.se_reduce = nn.Conv2d(40, 10, 1)
        self.se_expand = nn.Conv2d(10, 40, 1)
        self.c = nn.Conv2d(40, 32, 1)
        self.d = nn.Conv2d(32, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(48 * 4 * 4, 64)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.bn_cat(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)))
        y = self.dw(y)
        y = y * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = F.relu(self.c(y))
        z = torch.cat([F.relu(self.d(y)), F.max_pool2d(y, 2)], 1)
        return self.fc2(self.drop(F.relu(self.fc1(torch.flatten(z, 1)))))


def _images(n: int, c: int = 1, size: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.3)


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    net = randomize(ResidualCNN())
    return net, make_dynamic(net, _images(2), gate_after="layer2").eval()


def test_residual_cnn_full_width_is_the_original(residual):
    net, dyn = residual
    x = _images(6, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x, subnet=dyn.largest), net(x), rtol=1e-5, atol=1e-5)
    assert net.stem[0].weight.shape == (16, 1, 3, 3)  # the source network is left alone
    assert not any(isinstance(m, SliceableModule) for m in net.modules())


def test_residual_cnn_groups_subnets_and_macs(residual):
    _, dyn = residual
    names = {g.name: g for g in dyn.groups.values()}
    # the stem and layer1's residual adds are one group; layer2's conv2 and projection shortcut another
    assert set(names["stem.0"].producers) == {"stem.0", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(names["layer2.conv2"].producers) == {"layer2.conv2", "layer2.down.0"}
    assert names["fc"].fixed == "the network's output" and not dyn.unsliced
    assert dyn.routing_space == [0, 1, 2, 3] and not dyn.subnets[-1].routed
    # groups before the gate run at one width in every routed sub-network, groups after it widen
    for s in dyn.subnets[:4]:
        assert s.as_dict()["stem.0"] == 8 and s.as_dict()["layer2.conv1"] == 8
    assert [s.as_dict()["layer3.conv2"] for s in dyn.subnets] == [16, 32, 48, 64, 64]
    macs = [dsnet.count_macs(dyn, (1, 1, 16, 16), subnet=k) for k in range(len(dyn.subnets))]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    # the largest is the original network plus the gate's squeeze-excitation (two small linear layers)
    assert macs[-1] == dsnet.count_macs(residual[0], (1, 1, 16, 16)) + 2 * dyn.gate.channels * dyn.gate.reduced


def test_residual_cnn_extraction_equals_slicing(residual):
    _, dyn = residual
    x = _images(5, seed=2)
    with torch.no_grad():
        for k in range(len(dyn.subnets)):
            static = dyn.extract(k)
            assert not any(isinstance(m, SliceableModule) for m in static.modules())
            torch.testing.assert_close(static(x), dyn(x, subnet=k), rtol=0, atol=1e-6)
    assert dsnet.count_macs(static, x[:1].shape) == dsnet.count_macs(dyn, x[:1].shape, subnet=k)


def test_residual_cnn_routing_equals_per_sample(residual):
    _, dyn = residual
    x = _images(8, seed=3)
    with torch.no_grad():
        dyn.gate.slim_head.weight.normal_(0, 3.0)
        bias = -dyn(x, return_routing=True).gate_logits.mean(0)
        batch = dyn(x, return_routing=True, gate_bias=bias)
        singles = [dyn(x[i : i + 1], return_routing=True, gate_bias=bias) for i in range(len(x))]
    assert len(set(batch.subnet.tolist())) > 1
    assert batch.subnet.tolist() == [s.subnet.item() for s in singles]
    torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        dyn.gate.budget_bias.copy_(bias)  # the stored bias routes as the run-time one did
    per_sample_macs = dsnet.count_macs(dyn, x)
    table = dyn.routing_macs((1, 16, 16)).long()
    assert per_sample_macs.tolist() == table[batch.choice].tolist()


def test_residual_cnn_trains(residual):
    _, dyn = residual
    model = make_dynamic(ResidualCNN(), _images(2), gate_after="layer2").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _images(16, seed=4), torch.arange(16) % 10
    for k in (model.largest, 0):
        opt.zero_grad()
        F.cross_entropy(model(x, subnet=k), y).backward()
        assert model.gate.expand.weight.grad is not None or k == 0  # the identity-started attention learns
        opt.step()
    F.cross_entropy(model(x), y).backward()  # dynamic routing in training (straight-through Gumbel)
    assert all(p.grad is not None for p in model.routing_head().parameters())


def test_importance_order_keeps_the_function_and_ranks_channels():
    torch.manual_seed(1)
    net = randomize(ResidualCNN())
    x = _images(4, seed=5)
    ordered = make_dynamic(net, x, gate_after="layer2").eval()
    plain = make_dynamic(net, x, gate_after="layer2", importance=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(ordered(x, subnet=ordered.largest), net(x), rtol=1e-5, atol=1e-5)
        plain.set_inference_cache(enabled=False)  # BatchNorm not folded: the original's operations
        assert torch.equal(plain(x, subnet=plain.largest), net(x))  # no permutation: bit for bit
        plain.set_inference_cache()  # folded into the convolutions: equal up to rounding
        torch.testing.assert_close(plain(x, subnet=plain.largest), net(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ordered(x, subnet=0), plain(x, subnet=0))
    # layer3's first conv: BN-folded L1 norms are now in decreasing order
    conv, bn = ordered.net.layer3.conv1, ordered.net.layer3.bn1
    slot = ordered.slots(ordered.largest)[-1]
    score = conv.weight.abs().flatten(1).sum(1) * bn.weight.abs() / (bn.running_var[slot] + bn.eps).sqrt()
    assert torch.all(score[:-1] >= score[1:] - 1e-6)


def test_concatenation_squeeze_excitation_and_flatten():
    torch.manual_seed(2)
    net = randomize(ConcatCNN())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.3)
    x = _images(4, c=3, size=8, seed=6)
    dyn = make_dynamic(net, x, gate_after="bn").eval()
    names = {g.name: g for g in dyn.groups.values()}
    # both branches slice on their own; the squeeze-excitation's expand writes both of them side by side
    assert names["a"].fixed is None and names["b"].fixed is None and not dyn.unsliced
    assert "se_expand" in names["a"].producers and "se_expand" in names["b"].producers
    with torch.no_grad():
        torch.testing.assert_close(dyn(x, subnet=dyn.largest), net(x), rtol=1e-5, atol=1e-5)
        for k in range(len(dyn.subnets)):
            torch.testing.assert_close(dyn.extract(k)(x), sliced(dyn, x, k), rtol=0, atol=1e-6)
    macs = [dsnet.count_macs(dyn, x[:1].shape, subnet=k) for k in range(len(dyn.subnets))]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)


class Untraceable(ResidualCNN):
    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:  # control flow on a tensor value
            x = -x
        return super().forward(x)


class WithGroupNorm(ResidualCNN):
    def __init__(self) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(4, 32)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.gn(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_errors_and_reports_are_clear():
    x = _images(2)
    with pytest.raises(ValueError, match=r"torch.fx cannot trace Untraceable .*control flow"):
        make_dynamic(Untraceable(), x, gate_after="layer2")
    with pytest.raises(ValueError, match=r"has no such module; did you mean 'layer2'"):
        make_dynamic(ResidualCNN(), x, gate_after="layr2")
    with pytest.raises(ValueError, match=r"does not cut the network in two"):
        make_dynamic(ResidualCNN(), x, gate_after="layer2.bn2")  # the shortcut skips past it
    with pytest.raises(ValueError, match=r"width_ratios must .* end"):
        make_dynamic(ResidualCNN(), x, gate_after="layer2", width_ratios=(0.5, 0.75))
    # a layer it cannot slice is named, with the reason, and its groups keep full width
    with pytest.warns(UserWarning, match=r"gn: GroupNorm is not a layer dsnet can slice"):
        dyn = make_dynamic(WithGroupNorm(), x, gate_after="layer1")
    assert [u.name for u in dyn.unsliced] == ["gn"]
    assert {g.name: g for g in dyn.groups.values()}["layer2.conv2"].fixed.startswith("read by gn")
    with pytest.raises(ValueError, match=r"strict=True.*gn: GroupNorm"):
        make_dynamic(WithGroupNorm(), x, gate_after="layer1", strict=True)


def test_source_weights_load_like_make_dynamic(tmp_path):
    """A factory's network loads the original network's state dict, converted and ordered the same way."""
    torch.manual_seed(3)
    net = randomize(ResidualCNN())
    x = _images(3)
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)
    loaded = dsnet.create_model("tests.test_convert:residual_factory", checkpoint_path=str(path)).eval()
    direct = make_dynamic(net, x, gate_after="layer2").eval()
    with torch.no_grad():
        for k in (0, loaded.largest):
            torch.testing.assert_close(loaded(x, subnet=k), direct(x, subnet=k), rtol=0, atol=1e-6)


def residual_factory(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """What a user's ``model.name: "package.module:factory"`` points at."""
    return make_dynamic(ResidualCNN(in_chans, num_classes), torch.zeros(2, in_chans, 16, 16), gate_after="layer2")


def test_reorder_channels_of_a_dsnet_model_keeps_the_largest():
    torch.manual_seed(4)
    ref = randomize(TVResNet(TVBasicBlock, [1, 1, 1], 10, 1, (32, 64, 128), 32, cifar_stem_stride=2))
    model = dsnet.create_model("ds_resnet8_tiny", in_chans=1)
    load_pretrained(model, ref.state_dict(), importance=None)
    x = _images(3, size=28)
    with torch.no_grad():
        before = model.eval()(x, subnet=model.largest)
        # the gate's logits on full-width features (routed ones see a pre-gate prefix, which reordering changes)
        gate_before = model.gate.logits(model.forward_pre(x, model.largest)[1])
        torch.testing.assert_close(before, ref(x), rtol=1e-5, atol=1e-5)  # BatchNorm folded: up to rounding
        model.set_inference_cache(enabled=False)
        assert torch.equal(model(x, subnet=model.largest), ref(x))  # unfolded: bit for bit
        model.set_inference_cache()
        # stem/layer1 stream, 3 block interiors, layer2 and layer3 streams, the gate encoder
        assert reorder_channels(model) == 7
        torch.testing.assert_close(model(x, subnet=model.largest), before, rtol=1e-5, atol=1e-5)
        gate_after = model.gate.logits(model.forward_pre(x, model.largest)[1])
        torch.testing.assert_close(gate_after, gate_before, rtol=1e-5, atol=1e-5)


def test_factory_model_trains_from_source_weights_and_reloads(tmp_path):
    """``model.name: "module:factory"`` + ``model.checkpoint_path`` through stage I, then the checkpoint reloads."""
    from dsnet.train.checkpoint import load_model
    from dsnet.train.config import load_config
    from dsnet.train.supernet import train_supernet

    torch.manual_seed(5)
    plain = tmp_path / "plain.pt"
    torch.save(randomize(ResidualCNN()).state_dict(), plain)
    cfg = load_config(
        None,
        [
            "model.name=tests.test_convert:residual_factory",
            f"model.checkpoint_path={plain}",
            "data.dataset=synthetic",
            "data.synthetic.num_train=64",
            "data.synthetic.num_val=32",
            "data.synthetic.channels=1",
            "data.synthetic.image_size=16",
            "data.batch_size=32",
            "data.workers=0",
            "supernet.epochs=1",
            "supernet.bn_calibration_batches=1",
            "log.progress=false",
            "log.tensorboard=false",
        ],
    )
    train_supernet(cfg, tmp_path / "run")
    # the checkpoint names a factory: rebuilt only when the user allows it
    with pytest.raises(ValueError, match="--trust-factory tests.test_convert:residual_factory"):
        load_model(tmp_path / "run" / "best.ckpt")
    model, ckpt = load_model(tmp_path / "run" / "best.ckpt", trust_factories=["tests.test_convert:residual_factory"])
    assert ckpt["model"] == {
        "name": "tests.test_convert:residual_factory",
        "kwargs": {"num_classes": 10, "in_chans": 1},
    }
    assert isinstance(model, dsnet.DynamicNet) and float(model.gate.attention_gain) == 2.0
    x = _images(2)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_static_export_of_a_converted_network(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dsnet.export import check_static, export_static

    torch.manual_seed(6)
    net = randomize(ConcatCNN())
    x = _images(3, c=3, size=8)
    dyn = make_dynamic(net, x, gate_after="bn").eval()
    path = export_static(dyn, 1, tmp_path / "s1.onnx")  # interleaved concatenation, flattened classifier
    assert check_static(dyn, 1, path, x) < 1e-4
