"""DS-ViT with embedding width, heads and MLP hidden width as separate dimensions (``separate_dims=True``)."""

import pytest
import torch

import dsnet
from dsnet.baselines import usnet_widths
from tests.conftest import perturb, sliced, small_input

# Tiny ViT: 16 px, patch 4 (16 patches + class token), 48 dims = 3 heads of 16, MLP 96, 1 + 2 blocks.
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "num_heads": 3, "depths": (1, 2), "mlp_ratio": 2.0}
TOKENS = 16 + 1

# A mixed space (separate layout, nested form): embedding stage, then (embed, heads, mlp) per block group.
# The post-gate group varies one dimension at a time between the slimmest and the widest.
MIXED = [
    [48, [16, 1, 32], [16, 1, 32]],
    [48, [16, 1, 32], [16, 3, 32]],  # wide in heads, narrow MLP and embedding
    [48, [16, 1, 32], [48, 1, 32]],  # wide embedding slice only
    [48, [16, 1, 32], [32, 2, 96]],  # full MLP, two heads
    [48, [16, 1, 32], [48, 3, 96]],
]

# Outputs of the tied default model before separate dimensions existed (generated at commit ed351d9 with the
# weights of ``_fill(seed=2)`` and the input of ``_input()``): sub-network logits, MACs, routed sub-networks.
GOLDEN = {
    True: {  # idle slicing
        "widths": [[48, 16, 16], [48, 16, 32], [48, 16, 48], [48, 48, 48]],
        "macs": [170400, 397792, 764448, 1061472],
        "routed": [2, 0, 1, 1],
        "logits": [
            [[-0.89428, -0.055419, 0.498892, -0.603778], [-0.918733, -0.02767, 0.523995, -0.595415],
             [-0.784398, -0.197633, 0.419524, -0.684057], [-0.819479, -0.160741, 0.44578, -0.666993]],
            [[-0.408242, -0.049888, 0.459878, -0.85847], [-0.412655, -0.0944, 0.405429, -0.842021],
             [-0.959037, 0.245536, 0.576064, -0.671147], [-0.875731, 0.1767, 0.559009, -0.724519]],
            [[-0.294566, -0.25467, 0.319295, -0.696675], [-0.39406, -0.198537, 0.348986, -0.733894],
             [-0.325403, -0.012168, 0.180342, -0.349393], [-0.284836, -0.044471, 0.182415, -0.421106]],
            [[-0.32433, -0.284165, 0.416586, -0.607689], [-0.367351, -0.250709, 0.435418, -0.637111],
             [-0.448645, -0.053115, 0.212847, -0.328715], [-0.401032, -0.100185, 0.259263, -0.392993]],
        ],
    },
    False: {  # plain slicing
        "widths": [[16, 16, 16], [16, 16, 32], [16, 16, 48], [48, 48, 48]],
        "macs": [144928, 372384, 739104, 1061472],
        "routed": [0, 0, 1, 1],
        "logits": [
            [[-0.375299, 0.284562, 0.447665, -0.140856], [-0.392855, 0.303084, 0.465834, -0.132479],
             [-0.337091, 0.229659, 0.417991, -0.181303], [-0.348989, 0.247936, 0.437291, -0.175799]],
            [[-0.308168, 0.211732, 0.394492, -0.314791], [-0.359268, 0.204864, 0.362675, -0.262122],
             [-0.361659, 0.272825, 0.50625, -0.32594], [-0.375851, 0.259339, 0.479513, -0.315505]],
            [[-0.241049, -0.248766, 0.165156, -0.607972], [-0.296971, -0.23145, 0.139271, -0.581869],
             [-0.222814, -0.118372, 0.301523, -0.47664], [-0.20896, -0.120464, 0.247171, -0.49428]],
            [[-0.32433, -0.284165, 0.416586, -0.607689], [-0.367351, -0.250709, 0.435418, -0.637111],
             [-0.448645, -0.053115, 0.212847, -0.328715], [-0.401032, -0.100185, 0.259263, -0.392993]],
        ],
    },
}  # fmt: skip


def _tiny(**kwargs) -> dsnet.models.base.DynamicNet:
    # the paper's gate: GOLDEN's routed sub-networks are its decisions, and _fill draws every tensor in order
    return dsnet.create_model("ds_vit_cifar", **{**TINY, "num_classes": 4, "gate_mode": "pre", **kwargs})


def _fill(model, seed: int = 2):
    """Every parameter and BN statistic from a fixed generator (independent of the initialisation code)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (20.0 if "slim_head" in name else 0.2))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _input() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    return x * (torch.rand(4, 1, 1, 1, generator=g) * 2.5 + 0.25) + 2 * torch.randn(4, 1, 1, 1, generator=g)


def _perturb_norms(model, seed: int = 0):
    """Random LayerNorm affines, so a LayerNorm sliced at the wrong width shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in f".{name}" and p.dim() == 1:
                p.copy_(
                    torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else torch.randn(p.shape) * 0.1
                )
    return model


# ------------------------------------------------------------------ the default space is unchanged
@pytest.mark.parametrize("idle", [True, False], ids=["idle", "plain"])
@pytest.mark.parametrize("separate", [False, True], ids=["tied", "separate"])
def test_default_space_reproduces_the_unmodified_model(idle, separate):
    golden = GOLDEN[idle]
    model = _fill(_tiny(idle_slicing=idle, separate_dims=separate))
    assert [list(d[0] for d in model.block_dims(k)) for k in range(len(model.subnets))] == [
        w[1:] for w in golden["widths"]
    ]
    assert model.routing_space == [0, 1, 2] and len(model.subnets) == 4
    assert model.subnet_macs() == golden["macs"]
    x = _input()
    with torch.no_grad():
        for k, expected in enumerate(golden["logits"]):
            torch.testing.assert_close(model(x, subnet=k), torch.tensor(expected), rtol=0, atol=2e-6)
        assert model(x, return_routing=True).subnet.tolist() == golden["routed"]


@pytest.mark.parametrize("idle", [True, False], ids=["idle", "plain"])
def test_separate_layout_of_the_default_space_is_bit_identical_and_loads_tied_checkpoints(idle):
    tied = perturb(dsnet.create_model("ds_vit_cifar", idle_slicing=idle))
    separate = dsnet.create_model("ds_vit_cifar", idle_slicing=idle, separate_dims=True)
    separate.load_state_dict(tied.state_dict())  # strict: a tied checkpoint's keys and shapes, unchanged
    separate.eval()
    # the same sub-networks, written three dimensions per group
    assert [separate.block_dims(k) for k in range(5)] == [tied.block_dims(k) for k in range(5)]
    assert separate.block_dims(1)[1] == (64, 2, 128) and separate.subnets[1].widths[-3:] == (64, 2, 128)
    assert separate.routing_space == tied.routing_space == [0, 1, 2, 3]
    assert [s.routed for s in separate.subnets] == [s.routed for s in tied.subnets]
    gate = separate.gate_stage - 1, tied.gate_stage - 1  # the gate BN's statistics slot of every sub-network
    assert [separate.slots(k)[gate[0]] for k in range(5)] == [tied.slots(k)[gate[1]] for k in range(5)]
    assert separate.slots(4)[gate[0]] != separate.slots(3)[gate[0]]  # the wider pre-gate largest: its own
    assert separate.subnet_macs() == tied.subnet_macs()
    assert [separate.width_ratio(k) for k in range(5)] == [tied.width_ratio(k) for k in range(5)]
    # the tied space listed explicitly, built from the tied model's sub-networks the old way
    explicit = [[w[0], *((e, e // tied.head_dim, 2 * e) for e in w[1:])] for w in (s.widths for s in tied.subnets[:4])]
    listed = dsnet.create_model("ds_vit_cifar", idle_slicing=idle, separate_dims=True, subnet_widths=explicit)
    assert [s.widths for s in listed.subnets] == [s.widths for s in separate.subnets[:4]]
    # no training-only largest in an explicit list: one statistics slot fewer, the rest of the state as is
    listed.load_state_dict({k: v for k, v in tied.state_dict().items() if not k.startswith("_gate.bn.")}, strict=False)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(listed.gate.bn, name).copy_(
                getattr(tied.gate.bn, name)[..., :4, :] if "running" in name else getattr(tied.gate.bn, name)
            )
    listed.eval()
    assert listed.subnet_macs() == tied.subnet_macs()[:4]
    x = small_input(tied, batch=6)
    with torch.no_grad():
        for k in range(5):
            assert torch.equal(separate(x, subnet=k), tied(x, subnet=k))
            assert torch.equal(separate.extract(k)(x), tied.extract(k)(x))
        a, b = separate(x, return_routing=True), tied(x, return_routing=True)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.subnet, b.subnet)
        assert len(set(b.subnet.tolist())) > 1  # the comparison covers mixed routing
        for k in range(4):
            assert torch.equal(listed(x, subnet=k), tied(x, subnet=k))


# ------------------------------------------------------------------ independent dimensions
@pytest.mark.parametrize("idle", [True, False], ids=["idle", "plain"])
def test_independent_dims_equal_their_extracted_networks(idle):
    torch.manual_seed(0)
    space = [[48 if idle else 16, *groups] for _, *groups in MIXED]
    model = _perturb_norms(perturb(_tiny(separate_dims=True, idle_slicing=idle, subnet_widths=space)))
    assert [model.block_dims(k)[1] for k in range(len(space))] == [tuple(net[2]) for net in space]
    x = small_input(model, batch=3, size=16)
    outputs = []
    with torch.no_grad():
        for k, net in enumerate(space):
            static = model.extract(k)
            torch.testing.assert_close(model(x, subnet=k), static(x), rtol=0, atol=1e-5)
            outputs.append(static(x))
            embed, heads, hidden = net[2]
            block = static[-2]  # the last block (the head follows it)
            assert block.width == embed and block.attn.num_heads == heads
            assert block.attn.qkv.weight.shape == (3 * heads * 16, embed)
            assert block.attn.proj.weight.shape == (embed, heads * 16)
            assert block.mlp[0].weight.shape == (hidden, embed) and block.mlp[2].weight.shape == (embed, hidden)
            assert block.norm1.normalized_shape == (embed,)
    for a in range(len(outputs)):  # every dimension matters: no two sub-networks compute the same function
        for b in range(a):
            assert not torch.allclose(outputs[a], outputs[b], atol=1e-4)


def test_batched_routing_equals_per_sample_routing_in_a_mixed_space():
    model = _perturb_norms(perturb(_tiny(separate_dims=True, subnet_widths=MIXED), seed=3))
    assert model.routing_space == [0, 1, 2, 3] and len(model.subnets) == 5  # default: the first four
    model = _perturb_norms(
        perturb(_tiny(separate_dims=True, subnet_widths=MIXED, routing_space=[0, 1, 2, 3, 4]), seed=3)
    )
    x = torch.cat([small_input(model, batch=16, size=16, seed=s) for s in range(2)])
    with torch.no_grad():
        routed = model(x, return_routing=True)
        assert len(set(routed.subnet.tolist())) >= 3  # several groups, so the gather/scatter is exercised
        for i in range(len(x)):
            own = model(x[i : i + 1], subnet=routed.subnet[i].item())
            torch.testing.assert_close(routed.logits[i : i + 1], own, rtol=0, atol=1e-5)


def test_macs_equal_the_extracted_networks_and_mlp_narrowing_saves_its_share():
    model = _tiny(separate_dims=True, subnet_widths=MIXED).eval()
    macs = model.subnet_macs()
    for k in range(len(MIXED)):
        assert macs[k] == dsnet.count_macs(model.extract(k), (1, 3, 16, 16))
    wide_mlp = _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 1, 32], [48, 3, 96]]])
    narrow_mlp = _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 1, 32], [48, 3, 40]]])
    saved = wide_mlp.subnet_macs()[1] - narrow_mlp.subnet_macs()[1]
    blocks, embed = 2, 48  # the post-gate group: fc1 (embed x hidden) and fc2 (hidden x embed) per token
    assert saved == blocks * TOKENS * 2 * embed * (96 - 40)
    # narrowing heads only saves q/k/v/proj rows and the attention matmuls; the MLP share is unchanged
    fewer_heads = _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 1, 32], [48, 1, 96]]])
    per_head = blocks * (TOKENS * 4 * embed * 16 + 2 * TOKENS * TOKENS * 16)  # qkv + proj, q@k^T and attn@v
    assert wide_mlp.subnet_macs()[1] - fewer_heads.subnet_macs()[1] == 2 * per_head


# ------------------------------------------------------------------ tools over the separate layout
def test_subnet_widths_round_trip_and_usnet_grid_in_the_separate_layout():
    model = _tiny(separate_dims=True, subnet_widths=MIXED)
    flat = [list(s.widths) for s in model.subnets]
    assert flat[1] == [48, 16, 1, 32, 16, 3, 32]
    again = _tiny(separate_dims=True, subnet_widths=flat)  # what alone/search/usnet pass back
    assert [s.widths for s in again.subnets] == [s.widths for s in model.subnets]
    assert again.subnets[0].stage_names[1:4] == ("blocks0-0.embed", "blocks0-0.heads", "blocks0-0.mlp")
    grid = usnet_widths(_tiny(separate_dims=True))
    heads = [w[5] for w in grid]
    assert heads == sorted(heads) and heads[0] == 1 and heads[-1] == 3 and len(set(heads)) == 3
    built = _tiny(separate_dims=True, subnet_widths=grid)  # every grid point is a valid sub-network
    assert len(built.subnets) == len(grid)


def test_bad_separate_dims_are_rejected():
    with pytest.raises(ValueError, match=r"subnet_widths\[1\]: expected"):
        _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 1], [48, 3, 96]]])
    with pytest.raises(ValueError, match="outside"):  # 4 heads of 3
        _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 1, 32], [48, 4, 96]]])
    with pytest.raises(ValueError, match="outside"):  # MLP wider than the layer
        _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 1, 32], [48, 3, 97]]])
    with pytest.raises(ValueError, match="always 48 wide"):
        _tiny(separate_dims=True, subnet_widths=[[32, [16, 1, 32], [16, 1, 32]]])
    with pytest.raises(ValueError, match="share the widths of the stages before the gate"):
        _tiny(separate_dims=True, subnet_widths=[MIXED[0], [48, [16, 2, 32], [48, 3, 96]]])
    with pytest.raises(ValueError, match="one width per stage"):  # the tied layout has 3 stages, not 7
        _tiny(subnet_widths=[[48, 16, 1, 32, 16, 1, 32]])
    with pytest.raises(ValueError, match="need separate_dims=True"):
        _tiny(subnet_widths=MIXED)
    with pytest.raises(ValueError, match="block group 1..2"):
        _tiny(separate_dims=True, gate_stage=3)
    block = _tiny().blocks[0]
    with pytest.raises(ValueError, match="holds 3 heads, asked for 4"):
        block(torch.randn(1, 3, 48), 48, True, heads=4)
    with pytest.raises(ValueError, match="holds 96 output features, asked for 0"):
        block(torch.randn(1, 3, 48), 48, True, hidden=0)
    with pytest.raises(ValueError, match="heads must be an int in 1..3"):
        block.to_static(48, True, heads=4)
    with pytest.raises(ValueError, match="hidden width must be an int in 1..96"):
        block.to_static(48, True, hidden=0)  # (nn.Linear would otherwise take 0 as "all")


# ------------------------------------------------------------------ progressive search over heads and MLP
SYNTH = {
    "dataset": "synthetic",
    "synthetic": {"num_train": 256, "num_val": 64, "image_size": 16, "num_classes": 4},
    "batch_size": 32,
    "eval_batch_size": 64,
    "workers": 0,
    "holdout": 64,
}
START = [48, [16, 1, 32], [48, 3, 96]]  # the network the search starts from (trained alone)


def _search_vit(**kwargs):
    return _tiny(separate_dims=True, in_chans=1, **kwargs)


def test_channel_map_of_separate_dims_permutes_heads_and_hidden_units_keeping_the_function():
    from dsnet.search.channels import channel_map, permute_space_

    model = _perturb_norms(perturb(_tiny(separate_dims=True)))
    spaces = channel_map(model)
    names = [model.subnets[0].stage_names[s.stages[0]] for s in spaces]
    assert names == ["blocks0-0.heads", "blocks0-0.mlp", "blocks1-2.heads", "blocks1-2.mlp"]
    assert [(s.units, s.group) for s in spaces] == [(3, 1), (96, None)] * 2
    x = small_input(model, batch=3, size=16)
    qkv = model.blocks[1].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        before = model(x, subnet=model.largest)
        g = torch.Generator().manual_seed(0)
        for space in spaces:
            permute_space_(model, space, torch.randperm(space.units, generator=g))
        model.clear_inference_cache()
        torch.testing.assert_close(model(x, subnet=model.largest), before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.blocks[1].attn.qkv.weight, qkv)  # the heads did move
    with pytest.raises(ValueError, match="separate_dims=True"):
        channel_map(_tiny())  # tied: the embedding width (one stream order for every group) moves with the heads


def test_search_removes_whole_heads_and_hidden_groups_after_the_gate():
    from dsnet.data import build_loader
    from dsnet.search.pss import ProgressiveSearch

    torch.manual_seed(0)
    model = _search_vit(subnet_widths=[START])
    loader, _ = build_loader(SYNTH, "train", seed=0)
    holdout, _ = build_loader(SYNTH, "holdout", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, subnet=0), y).backward()
        opt.step()
    settings = {"noise_steps": 3, "finetune_steps": 1, "threshold": 50.0, "calibration_batches": 1, "eval_batches": 1}
    search = ProgressiveSearch(
        model.eval(), {"name": "tiny", "kwargs": {}}, loader, holdout, settings, factory=_search_vit
    )
    assert search.group_sizes == [1, 8]  # heads one at a time, hidden units by pss.group_size
    start = search.macs(search.widths())
    floor = search.macs(search.smallest_widths())
    assert search.smallest_widths() == (48, 16, 1, 32, 48, 1, 8)  # the embedding width is not searched
    result = search.run([start, floor + 0.4 * (start - floor), floor])
    chain = [c.widths for c in result.chain]
    assert chain[0] == (48, 16, 1, 32, 48, 3, 96) and chain[-1] == (48, 16, 1, 32, 48, 1, 8)
    steps = {tuple(a - b for a, b in zip(wider, slimmer)) for wider, slimmer in zip(chain, chain[1:])}
    assert steps == {(0, 0, 0, 0, 0, 1, 0), (0, 0, 0, 0, 0, 0, 8)}  # one head, or eight hidden units, per step
    final = search.final_model(result, 1)
    assert [list(s.widths) for s in final.subnets] == result.subnet_widths and len(final.subnets) >= 2
    x = small_input(final, batch=2, size=16)
    with torch.no_grad():
        for k in range(len(final.subnets)):
            torch.testing.assert_close(sliced(final, x, k), final.extract(k)(x), rtol=0, atol=1e-5)


def test_search_cli_from_a_separate_dims_supernet(tmp_path, capsys):
    """``dsnet search`` on a DS-ViT supernet with separate dimensions: heads and MLP searched, embedding kept."""
    from dsnet.cli import main
    from dsnet.train.checkpoint import load_model, save_checkpoint
    from dsnet.train.config import resolve_config

    kwargs = {**TINY, "num_classes": 4, "in_chans": 1, "separate_dims": True}
    cfg = resolve_config({"model": {"name": "ds_vit_cifar", "kwargs": kwargs}, "data": SYNTH})
    model = perturb(dsnet.create_model("ds_vit_cifar", **kwargs))
    save_checkpoint(
        tmp_path / "sup.ckpt",
        {"model": {"name": "ds_vit_cifar", "kwargs": kwargs}, "state_dict": model.state_dict(), "config": cfg},
    )
    widest = model.subnets[model.routing_space[-1]].widths
    assert widest == (48, 16, 1, 32, 48, 3, 96)
    start = model.subnet_macs((1, 16, 16))[model.routing_space[-1]]
    floor = dsnet.create_model("ds_vit_cifar", **kwargs, subnet_widths=[[48, 16, 1, 32, 48, 1, 8]]).subnet_macs()[0]
    targets = f"{floor * 1.05 / 1e6},{(floor + start) / 2e6}"
    out = tmp_path / "pss"
    args = ["search", "--checkpoint", str(tmp_path / "sup.ckpt"), "--out", str(out), "--no-progress"]
    tiny = ["pss.noise_steps=2", "pss.finetune_steps=1", "pss.calibration_batches=1", "pss.eval_batches=1"]
    assert main(args + [a for kv in tiny for a in ("--set", kv)] + ["--targets-mmacs", targets]) == 0
    assert "Searched sub-networks" in capsys.readouterr().out
    searched, ckpt = load_model(out / "best.ckpt")
    assert ckpt["model"]["kwargs"]["separate_dims"] is True and searched.separate_dims
    assert all(w[:5] == widest[:5] for w in (s.widths for s in searched.subnets))  # trunk and embedding kept
    assert max(searched.subnet_macs()) <= (floor + start) / 2
