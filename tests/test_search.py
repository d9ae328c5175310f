"""Progressive sub-network search: channel maps, noise ranking, removal to MAC targets, nesting, re-selection."""

import itertools

import pytest
import torch

import dsnet
from dsnet.models.resnet import DSResNet
from dsnet.search.channels import channel_map, permute_space_
from dsnet.search.noise import importance_order, learn_noise_scales
from dsnet.search.pss import ProgressiveSearch, pareto_front, reselect
from tests.conftest import perturb, small_input

SYNTH = {
    "dataset": "synthetic",
    "synthetic": {"num_train": 256, "num_val": 64, "image_size": 16, "num_classes": 4},
    "batch_size": 32,
    "eval_batch_size": 64,
    "workers": 0,
    "holdout": 64,
}


def tiny_resnet(**kwargs) -> DSResNet:
    """A 16-px DS-ResNet: stem 16, planes 16/32/32, one basic block per stage, gate before stage 2."""
    args = dict(
        block="basic",
        layers=(1, 1, 1),
        planes=(16, 32, 32),
        stem_width=16,
        stem="cifar",
        stem_stride=2,
        input_size=16,
        num_classes=4,
        in_chans=1,
        gate_stage=2,
    )
    return DSResNet(**{**args, **kwargs})


def trained_alone(widths=(16, 16, 32, 32), epochs=2, seed=0):
    from dsnet.data import build_loader

    torch.manual_seed(seed)
    model = tiny_resnet(subnet_widths=[list(widths)])
    loader, _ = build_loader(SYNTH, "train", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x, subnet=0), y).backward()
            opt.step()
    return model.eval(), loader


@pytest.mark.parametrize(
    "build",
    [
        lambda: dsnet.create_model("ds_resnet8_tiny"),  # stem and layer1 joined by an identity shortcut
        lambda: DSResNet(
            block="bottleneck",
            layers=(1, 2, 1),
            planes=(32, 32, 64),
            stem_width=16,
            num_classes=10,
            stem="cifar",
            input_size=32,
            gate_stage=2,
        ),
    ],
    ids=["basic", "bottleneck"],
)
def test_permuting_every_space_keeps_the_function(build):
    model = perturb(build()).eval()
    x = small_input(model, batch=3)
    spaces = channel_map(model)
    assert sorted(s for space in spaces for s in space.stages) == list(range(len(model.subnets[0].widths)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = model(x, subnet=model.largest)
        slim_before = model(x, subnet=0)
        for space in spaces:
            permute_space_(model, space, torch.randperm(space.units, generator=g))
        torch.testing.assert_close(model(x, subnet=model.largest), before, rtol=1e-4, atol=1e-4)
        # a narrower prefix now keeps other channels: the slim sub-network must change
        assert (model(x, subnet=0) - slim_before).abs().max() > 1e-3


def test_identity_shortcut_ties_stages_into_one_space():
    spaces = channel_map(dsnet.create_model("ds_resnet8_tiny"))
    assert [s.stages for s in spaces] == [(0, 1), (2,), (3,)]
    with pytest.raises(ValueError, match="identity shortcut"):
        dsnet.create_model("ds_resnet8_tiny", subnet_widths=[[16, 24, 16, 32], [16, 24, 64, 128]])


def test_no_channel_map_for_vit_is_a_clear_error():
    with pytest.raises(ValueError, match="DS-ResNet"):
        channel_map(dsnet.create_model("ds_vit_cifar"))


@pytest.mark.parametrize("useless", [0, 2])
def test_noise_ranking_puts_a_useless_group_last(useless):
    model, loader = trained_alone(seed=useless)
    space = channel_map(model)[-1]  # the last stage: 32 channels = 4 groups of 8
    group = slice(8 * useless, 8 * useless + 8)
    with torch.no_grad():  # nothing reads the group's channels any more: the inner ones and the residual ones
        model.blocks[2].conv2.weight[:, group] = 0
        model.classifier.weight[:, group] = 0
    batches = itertools.cycle(list(loader))
    log_alpha = learn_noise_scales(model, 0, [space], [4], 8, batches, 25, seed=useless)[0]
    assert importance_order(log_alpha)[-1].item() == useless, log_alpha
    assert log_alpha[useless] == log_alpha.max()


def test_pareto_front_and_reselection():
    points = [(1.0, 70.0), (2.0, 69.0), (2.5, 75.0), (4.0, 76.0), (4.5, 75.5), (6.0, 80.0)]
    assert pareto_front(points) == [0, 2, 3, 5]  # (2.0, 69) and (4.5, 75.5) are beaten by cheaper, better ones
    # each target: the most accurate efficient point within it
    assert reselect(points, [1.5, 3.0, 5.0, 6.0]) == [0, 2, 3, 5]
    assert reselect(points, [0.5]) == []


@pytest.mark.parametrize("threshold", [1e9, -1e9], ids=["never-finetune", "always-finetune"])
def test_search_meets_every_target_within_one_group_and_is_nested(threshold):
    from dsnet.data import build_loader

    model, loader = trained_alone(epochs=1)
    holdout, _ = build_loader(SYNTH, "holdout", seed=0)
    spec = {"name": "tiny", "kwargs": {}}
    search = ProgressiveSearch(
        model,
        spec,
        loader,
        holdout,
        {"noise_steps": 3, "finetune_steps": 2, "threshold": threshold, "calibration_batches": 1, "eval_batches": 1},
        factory=tiny_resnet,
    )
    start = search.macs(search.widths())
    floor = search.macs((16, 16, 8, 8))  # one group left in each searched stage
    targets = [floor + (start - floor) * f for f in (1.0, 0.6, 0.3, 0.02)]
    result = search.run(targets)
    chain = result.chain
    # one group (8 units of one searched stage) fewer per step; pre-gate stages untouched
    for wider, slimmer in zip(chain, chain[1:]):
        diff = [a - b for a, b in zip(wider.widths, slimmer.widths)]
        assert sorted(diff) == [0, 0, 0, 8] and diff[0] == diff[1] == 0
        assert slimmer.macs < wider.macs
    for target, hit in zip(result.targets, result.hits):
        assert chain[hit].macs <= target
        assert hit == 0 or chain[hit - 1].macs > target  # one group more would miss it
    assert (result.finetunes > 0) == (threshold < 0)
    if threshold < 0:
        assert result.finetunes == len(chain) - 1 and all(c.finetuned for c in chain[1:])
    # the selected set is nested (a prefix chain) and listed slimmest first
    nets = result.subnet_widths
    assert nets and all(all(a <= b for a, b in zip(n1, n2)) for n1, n2 in zip(nets, nets[1:]))
    final = search.final_model(result, calibration_batches=1)
    assert [s.widths for s in final.subnets] == [tuple(n) for n in nets]
    assert final.routing_space == list(range(len(nets)))


def test_searched_prefix_equals_the_original_network_without_the_dropped_groups():
    """After ranking permutes the channels, a prefix slice is exactly the original network minus the other groups."""
    import copy

    from dsnet.data import build_loader

    model, loader = trained_alone(epochs=1)
    original = copy.deepcopy(model)
    holdout, _ = build_loader(SYNTH, "holdout", seed=0)
    search = ProgressiveSearch(
        model, {"name": "tiny", "kwargs": {}}, loader, holdout, {"noise_steps": 4}, factory=tiny_resnet
    )
    search.rank()  # permutes the working weights of every searched space (stages 2 and 3)
    kept = search.group_ids[-1][:2].tolist()  # a 16-wide last stage keeps its two most important groups
    assert sorted(search.group_ids[-1].tolist()) == [0, 1, 2, 3]
    with torch.no_grad():
        for g in set(range(4)) - set(kept):  # remove the group from the original: nothing reads its channels
            original.blocks[2].conv2.weight[:, 8 * g : 8 * g + 8] = 0
            original.classifier.weight[:, 8 * g : 8 * g + 8] = 0
        sliced = tiny_resnet(subnet_widths=[[16, 16, 32, 16], [16, 16, 32, 32]], gate_mode="pre")  # no exit head
        state = search.work.state_dict()
        for name, t in sliced.state_dict().items():
            t.copy_(state[name] if state[name].shape == t.shape else state[name][:1].expand_as(t))
        x = small_input(sliced, batch=4, size=16)
        torch.testing.assert_close(sliced.eval()(x, subnet=0), original.eval()(x, subnet=0), rtol=1e-4, atol=1e-5)


def test_search_cli_from_a_supernet_checkpoint(tmp_path, capsys):
    """``dsnet search`` starts from a supernet's widest routed sub-network and saves a gate-ready supernet."""
    from dsnet.cli import main
    from dsnet.train.checkpoint import load_model, save_checkpoint
    from dsnet.train.config import resolve_config

    cfg = resolve_config({"model": {"name": "ds_resnet8_tiny"}, "data": {**SYNTH, "synthetic": {"image_size": 28}}})
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 10, "in_chans": 1}}
    model = perturb(dsnet.create_model(**{"name": spec["name"]}, **spec["kwargs"]))
    save_checkpoint(tmp_path / "sup.ckpt", {"model": spec, "state_dict": model.state_dict(), "config": cfg})
    out = tmp_path / "pss"
    args = ["search", "--checkpoint", str(tmp_path / "sup.ckpt"), "--out", str(out), "--no-progress"]
    tiny = ["pss.group_size=32", "pss.noise_steps=2", "pss.finetune_steps=2", "pss.calibration_batches=1"]
    assert main(args + [a for kv in tiny for a in ("--set", kv)] + ["--targets-mmacs", "3,6"]) == 0
    assert "Searched sub-networks" in capsys.readouterr().out
    searched, ckpt = load_model(out / "best.ckpt")
    assert ckpt["stage"] == "pss" and ckpt["bn_calibrated"]
    assert searched.routing_space == list(range(len(searched.subnets)))
    assert all(w[:2] == (16, 16) for w in (s.widths for s in searched.subnets))  # the pre-gate trunk is kept
    assert max(searched.subnet_macs()) <= 6e6 and len(searched.subnets) >= 1
    # data.holdout unset: one clear line
    assert main(args + ["--set", "data.holdout=0"]) == 2
    assert "data.holdout" in capsys.readouterr().err
