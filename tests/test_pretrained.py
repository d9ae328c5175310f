"""Pretrained import: torchvision/timm ResNet, timm DeiT, the official DS-Net release, against reference modules."""

import argparse

import pytest
import torch

import dsnet
from dsnet.models.mobilenet_v1 import OFFICIAL_STAGES
from dsnet.models.pretrained import load_pretrained
from dsnet.train.checkpoint import save_checkpoint
from dsnet.train.run import rng_state
from tests.reference_nets import (
    OfficialDSNet,
    TimmViT,
    TVBasicBlock,
    TVBottleneck,
    TVResNet,
    randomize,
)


def _x(c: int = 3, size: int = 64, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "block", "layers"),
    [("ds_resnet18", TVBasicBlock, [2, 2, 2, 2]), ("ds_resnet50", TVBottleneck, [3, 4, 6, 3])],
)
def test_torchvision_resnet_largest_subnet_is_the_source(name, block, layers, tmp_path):
    torch.manual_seed(0)
    ref = randomize(TVResNet(block, layers))
    source = ref.state_dict()
    if name == "ds_resnet18":  # one through a file, as a user would; the other straight from a state dict
        source = tmp_path / "resnet.pth"
        torch.save(ref.state_dict(), source)
    model = dsnet.create_model(name, checkpoint_path=source).eval()  # default: channels ordered by L1
    plain = dsnet.create_model(name).eval()
    report = load_pretrained(plain, source, importance=None)
    assert "torchvision/timm ResNet" in report.format and report.reordered_groups == 0
    assert all(k.startswith(("_gate.", "exit_head.")) for k in report.initialised)
    x = _x(size=32)
    with torch.no_grad():
        expected = ref(x)
        plain.set_inference_cache(enabled=False)  # BatchNorm not folded: the source's operations
        assert torch.equal(plain(x, subnet=plain.largest), expected)  # source order: bit for bit
        plain.set_inference_cache()  # folded into the convolutions: equal up to rounding
        torch.testing.assert_close(plain(x, subnet=plain.largest), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, subnet=model.largest), expected, rtol=1e-4, atol=1e-5)
        # importance order changes which channels the narrow sub-networks keep
        assert not torch.allclose(model(x, subnet=0), plain(x, subnet=0))
    # the gate's attention head starts as the identity, exactly, and can learn
    assert float(model.gate.attention_gain) == 2.0 and not model.gate.expand.weight.any()


def test_resnet_for_other_classes_and_grey_images():
    torch.manual_seed(1)
    ref = randomize(TVResNet(TVBasicBlock, [2, 2, 2, 2]))
    with pytest.warns(UserWarning, match="classifier .* keeps its initialisation"):
        model = dsnet.create_model("ds_resnet18", num_classes=10, checkpoint_path=ref.state_dict())
    assert model.classifier.weight.shape == (10, 512)
    grey_model = dsnet.create_model("ds_resnet18", in_chans=1)
    with pytest.warns(UserWarning, match="3 input channels summed into 1"):
        load_pretrained(grey_model, ref.state_dict(), importance=None)
    grey = _x(1)
    with torch.no_grad():  # the summed stem on a grey image = the RGB stem on that image in all three channels
        expected = ref(grey.expand(-1, 3, -1, -1))
        torch.testing.assert_close(grey_model.eval()(grey, subnet=grey_model.largest), expected, rtol=1e-4, atol=1e-5)


def test_mismatches_name_the_keys(tmp_path):
    r18 = TVResNet(TVBasicBlock, [2, 2, 2, 2]).state_dict()
    with pytest.raises(ValueError, match=r"lacks blocks\.\d+\.conv3\.weight"):
        load_pretrained(dsnet.create_model("ds_resnet50"), r18)
    extra = {**r18, "layer5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"has keys DSResNet has no place for: layer5\.0\.conv1\.weight"):
        load_pretrained(dsnet.create_model("ds_resnet18"), extra)
    with pytest.raises(ValueError, match=r"cannot tell the format .* \(dsnet, torchvision/timm ResNet\)"):
        load_pretrained(dsnet.create_model("ds_resnet18"), {"features.0.weight": torch.zeros(1)})
    bad = {**r18, "layer1.0.conv1.weight": torch.zeros(64, 64, 5, 5)}
    with pytest.raises(ValueError, match=r"blocks\.0\.conv1\.weight has shape \(64, 64, 5, 5\)"):
        load_pretrained(dsnet.create_model("ds_resnet18"), bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        dsnet.create_model("ds_resnet18", checkpoint_path=str(tmp_path / "missing.pth"))


def test_timm_deit_into_ds_vit_tiny():
    torch.manual_seed(2)
    ref = TimmViT(img_size=64, patch=16, dim=192, heads=3, depth=12).eval()
    deit_checkpoint = {"model": ref.state_dict()}  # facebookresearch/deit's container
    model = dsnet.create_model("ds_vit_tiny", img_size=64, checkpoint_path=deit_checkpoint).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x, subnet=model.largest), ref(x), rtol=1e-4, atol=1e-5)
    # a distilled DeiT has keys a DS-ViT has no place for
    distilled = {**ref.state_dict(), "dist_token": torch.zeros(1, 1, 192)}
    with pytest.raises(ValueError, match="no place for: dist_token"):
        load_pretrained(dsnet.create_model("ds_vit_tiny", img_size=64), distilled)


def test_official_dsnet_release_every_subnet(tmp_path):
    """The official checkpoint layout (timm CheckpointSaver, DataParallel prefix, argparse args, EMA)."""
    torch.manual_seed(3)
    stages = [(list(s.widths), s.depth, s.stride, i == 3) for i, s in enumerate(OFFICIAL_STAGES)]
    ref = randomize(OfficialDSNet([16, 24], stages))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    state = ref.state_dict()
    checkpoint = {
        "epoch": 149,
        "arch": "slimmable_mbnet_v1_bn_uniform",
        "state_dict": {f"module.{k}": v + 1 if v.is_floating_point() else v for k, v in state.items()},
        "state_dict_ema": {f"module.{k}": v for k, v in state.items()},  # preferred, as dsnet's own checkpoints
        "args": argparse.Namespace(model="slimmable_mbnet_v1_bn_uniform", num_choice=14),
        "version": 2,
    }
    path = tmp_path / "DS_MBNet-70_1.pth.tar"
    torch.save(checkpoint, path)
    model = dsnet.create_model("ds_mobilenet_v1", checkpoint_path=str(path)).eval()
    x = _x(size=32)
    with torch.no_grad():
        for k in (0, 6, 13):  # routed sub-network k = the official uniform sub-network k
            torch.testing.assert_close(model(x, subnet=k), ref(x, k), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x, subnet=model.largest), ref(x, -1), rtol=1e-4, atol=1e-5)
    # the official gate head (4 choices) is the routing head; its attention is the official SE (gain 1)
    torch.testing.assert_close(
        model.gate.slim_head.weight, state["blocks.3.first_block.gate.gate.0.weight"][:, :, 0, 0]
    )
    assert float(model.gate.attention_gain) == 1.0


def test_dsnet_checkpoint_and_module_factory_names(tmp_path):
    model = dsnet.create_model("ds_resnet8_tiny")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    again = dsnet.create_model("ds_resnet8_tiny", checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a dsnet run checkpoint holds more than tensors (config, RNG states): read as --resume reads it
    run = tmp_path / "last.ckpt"
    save_checkpoint(
        run, {"model": {"name": "ds_resnet8_tiny", "kwargs": {}}, "state_dict": model.state_dict(), "rng": rng_state()}
    )
    report = load_pretrained(dsnet.create_model("ds_resnet8_tiny"), run)
    assert report.format == "dsnet format, dsnet checkpoint, state_dict" and report.loaded == len(model.state_dict())
    with pytest.raises(
        ValueError, match=r"cannot import 'no_such_pkg.models' \(No module named 'no_such_pkg'\); is it on PYTHONPATH"
    ):
        dsnet.create_model("no_such_pkg.models:build")
    with pytest.raises(ValueError, match=r"has no function 'nope'"):
        dsnet.create_model("tests.test_convert:nope")
    with pytest.raises(
        ValueError, match=r"unexpected keyword argument 'depth'.*accepted arguments: in_chans, num_classes"
    ):
        dsnet.create_model("tests.test_convert:residual_factory", depth=3)
