"""MAC counts against the published numbers (SPEC section 5) and torchvision's ResNet-50."""

import pytest
import torch

import dsnet

# official DS-MobileNetV1 static sub-networks: index -> MMACs (SPEC section 5)
SPEC_MOBILENET = {0: 133, 1: 153, 3: 200, 7: 319, 9: 393, 13: 565}


def test_ds_mobilenet_v1_matches_spec():
    model = dsnet.create_model("ds_mobilenet_v1")
    macs = model.subnet_macs()
    assert len(model.subnets) == 15 and sum(s.routed for s in model.subnets) == 14
    assert model.routing_space == [0, 1, 2, 3]
    for k, expected in SPEC_MOBILENET.items():
        assert macs[k] / 1e6 == pytest.approx(expected, rel=0.01), k
    assert macs[-1] / 1e6 == pytest.approx(820, rel=0.01)  # the training-only largest


def test_ds_resnet50_full_width_is_standard_resnet50():
    model = dsnet.create_model("ds_resnet50")
    assert dsnet.count_macs(model, (1, 3, 224, 224), subnet=model.largest) / 1e9 == pytest.approx(4.09, abs=0.005)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("_gate."))
    assert backbone == 25_557_032  # torchvision resnet50
    assert model.extract(model.largest)[1].__class__.__name__ == "MaxPool2d"


def test_count_macs_plain_module_and_dynamic_batch():
    model = dsnet.create_model("ds_resnet20_cifar").eval()
    static = model.extract(2)
    assert dsnet.count_macs(static, (1, 3, 32, 32)) == dsnet.count_macs(model, (1, 3, 32, 32), subnet=2)
    x = torch.randn(5, 3, 32, 32)
    per_sample = dsnet.count_macs(model, x)
    routed = model(x, return_routing=True).subnet
    table = model.subnet_macs((3, 32, 32))
    assert per_sample.tolist() == [table[k] + model.gate_head_macs() for k in routed.tolist()]
    with pytest.raises(ValueError, match="dynamic MACs depend on the input"):
        dsnet.count_macs(model, (1, 3, 32, 32))
