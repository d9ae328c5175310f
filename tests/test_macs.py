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
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("_gate.", "exit_head.")))
    assert backbone == 25_557_032  # torchvision resnet50
    assert model.extract(model.largest)[1].__class__.__name__ == "MaxPool2d"


@pytest.mark.parametrize("gate_mode", ["pre", "exit"])
def test_count_macs_plain_module_and_dynamic_batch(gate_mode):
    model = dsnet.create_model("ds_resnet20_cifar", gate_mode=gate_mode).eval()
    static = model.extract(2)
    assert dsnet.count_macs(static, (1, 3, 32, 32)) == dsnet.count_macs(model, (1, 3, 32, 32), subnet=2)
    x = torch.randn(5, 3, 32, 32)
    per_sample = dsnet.count_macs(model, x)
    result = model(x, return_routing=True)
    table = model.subnet_macs((3, 32, 32))
    if gate_mode == "pre":  # the gate head, then the chosen sub-network
        assert per_sample.tolist() == [table[k] + model.gate_head_macs() for k in result.subnet.tolist()]
    else:  # the slimmest and the exit head for every sample, then the chosen wider one's post-gate part
        assert per_sample.tolist() == model.routing_macs((3, 32, 32)).long()[result.choice].tolist()
        assert all(m >= table[model.routing_space[0]] + model.gate_head_macs() for m in per_sample.tolist())
    with pytest.raises(ValueError, match="dynamic MACs depend on the input"):
        dsnet.count_macs(model, (1, 3, 32, 32))


def _measured_macs(model, image, choice: int) -> int:
    """Multiply-adds of one routed forward pass as torch's FlopCounterMode counts them (2 flops per MAC).

    Attention runs as its math decomposition (matmuls FlopCounterMode sees; the fused CPU kernel has no count).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    routed = model.forced_routing(torch.tensor([choice]))
    with routed, sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() // 2


ROUTED = [(name, "pre") for name in dsnet.list_models(kind="supernet")] + [
    (name, "exit")
    for name in ("ds_resnet8_tiny", "ds_mbv2_tiny", "ds_vit_tiny")  # one model per family
]


@pytest.mark.parametrize(("model_name", "gate_mode"), ROUTED)
def test_dynamic_macs_equal_what_each_routed_forward_measures(model_name, gate_mode):
    """dsnet.count_macs on a routed batch = FlopCounterMode on each image's own forward pass (gate and, in exit
    mode, the slimmest's exit head included): a measurement, not the table the count is built from."""
    from tests.conftest import small_input

    model = dsnet.create_model(model_name, gate_mode=gate_mode).eval()
    n = len(model.routing_space)
    x = small_input(model, batch=n)
    with model.forced_routing(torch.arange(n)):
        counted = dsnet.count_macs(model, x).tolist()
    assert counted == [_measured_macs(model, x[i : i + 1], i) for i in range(n)]
    assert counted == sorted(counted) and len(set(counted)) == n  # every choice differs: the check can tell them apart
