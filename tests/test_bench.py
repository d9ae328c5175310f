"""dsnet.bench: fast-path caches, zero-mask baseline, forced routing, report schema. No wall-clock asserts."""

import json

import pytest
import torch

import dsnet
from dsnet.bench import (
    SCHEMA,
    BenchConfig,
    ZeroMaskBaseline,
    forced_routing,
    format_report,
    mix_choices,
    mix_counts,
    run_benchmark,
    summarize,
)
from dsnet.cli import main
from dsnet.layers.sliced import SlicedConv2d
from dsnet.train.checkpoint import save_checkpoint
from tests.conftest import perturb, small_input

TINY = ["ds_resnet20_cifar", "ds_mobilenet_v1_cifar"]


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return perturb(dsnet.create_model(request.param))


def test_model_level_caches_follow_optimiser_step_and_load_state_dict():
    name = "ds_mobilenet_v1_cifar"
    model = perturb(dsnet.create_model(name))
    x = small_input(model, 4).contiguous(memory_format=torch.channels_last)
    k = model.routing_space[1]
    with torch.inference_mode():
        before = model(x, subnet=k)
    assert model.inference_cache_bytes() > 0  # the fast path cached (a first call: the layers' own caches)
    # an optimiser step changes the weights in place: the next inference must see them
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(small_input(model, 8, seed=3), subnet=k).square().mean().backward()
    opt.step()
    model.eval()
    with torch.inference_mode():
        after_step = model(x, subnet=k)
    fresh = model.extract(k).eval()
    with torch.no_grad():
        torch.testing.assert_close(after_step, fresh(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after_step, before)
    # load_state_dict back to other weights: again no stale cache entry
    other = perturb(dsnet.create_model(name), seed=7)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x, subnet=k), other(x, subnet=k), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-5)


def test_dynamic_routing_keeps_channels_last_through_grouping(tiny):
    model = tiny
    block = model.blocks[model.gate_block]
    conv = block.conv1 if hasattr(block, "conv1") else block.pw  # first convolution after the gate
    x = small_input(model, 8).contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.inference_mode(), forced_routing(model, torch.arange(8) % len(model.routing_space)):
        out = model(x)
    assert seen and all(seen)
    with torch.inference_mode():
        ref = torch.cat([model(x[i : i + 1], subnet=model.routing_space[i % 4]) for i in range(8)])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_zero_mask_baseline_equals_sliced_subnet_but_computes_full_width(tiny):
    model = tiny
    x = small_input(model, 4)
    widest = max(model.routing_space)
    widths = []
    for k in model.routing_space:
        baseline = ZeroMaskBaseline(model, k, x)
        convs = [c for c in baseline.calls if isinstance(c.module, SlicedConv2d)]
        widths.append([c.wide for c in convs])
        with torch.inference_mode():
            torch.testing.assert_close(baseline(x), model(x, subnet=k), rtol=1e-5, atol=1e-5)
        assert (baseline.masked_layers > 0) == (k != widest)
    # every baseline computes the widest routed sub-network's widths, whatever k
    assert all(w == widths[-1] for w in widths)
    # and the conv outputs really are full width: hook one routed conv during the masked run
    out_widths = []
    conv = [c.module for c in ZeroMaskBaseline(model, 0, x).calls if isinstance(c.module, SlicedConv2d)][-1]
    handle = conv.register_forward_hook(lambda _m, _i, y: out_widths.append(y.shape[1]))
    with torch.inference_mode():
        ZeroMaskBaseline(model, 0, x)(x)
        model(x, subnet=0)
    handle.remove()
    assert out_widths[-2] > out_widths[-1]


def test_mix_counts_and_forced_routing_are_exact():
    assert mix_counts([0.4, 0.3, 0.2, 0.1], 32) == [13, 10, 6, 3]
    assert sum(mix_counts([1, 1, 1], 10)) == 10
    with pytest.raises(ValueError):
        mix_counts([-1, 2], 4)
    model = dsnet.create_model("ds_resnet20_cifar").eval()
    choices = mix_choices([0.4, 0.3, 0.2, 0.1], 20)
    x = small_input(model, 20)
    with torch.inference_mode(), forced_routing(model, choices):
        res = model(x, return_routing=True)
    assert torch.equal(res.choice, choices)
    assert "logits" not in vars(model.gate)  # restored
    # batch-1 cycling: successive calls take successive choices
    with torch.inference_mode(), forced_routing(model, torch.tensor([3, 1, 2]), batch_size=1):
        got = [int(model(x[:1], return_routing=True).choice) for _ in range(4)]
    assert got == [3, 1, 2, 3]


def test_summarize_median_and_iqr():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.iqr, s.min, s.n) == (3.0, 2.0, 4.0, 2.0, 1.0, 5)


def _check_report(report, model):
    assert report["schema"] == SCHEMA
    assert report["widest_routed"] == max(model.routing_space)
    macs = {int(k): v for k, v in report["macs"].items()}
    for res in report["results"]:
        rows = {r["subnet"]: r for r in res["per_subnet"]}
        w = report["widest_routed"]
        for k, r in rows.items():
            for key in ("sliced_ms", "static_ms", "masked_ms"):
                assert r[key] > 0
            for method in ("sliced", "static", "masked"):
                st = res["methods"][f"{method}/{k}"]
                assert st["q1"] <= st["median"] <= st["q3"] and st["n"] == res["repeats"]
            assert r["theoretical_speedup"] == pytest.approx(macs[w] / macs[k])
            assert r["real_speedup"] == pytest.approx(rows[w]["sliced_ms"] / r["sliced_ms"])
            assert r["slicing_efficiency"] == pytest.approx(r["real_speedup"] / r["theoretical_speedup"])
            assert r["sliced_vs_static"] == pytest.approx(r["sliced_ms"] / r["static_ms"])
        assert rows[w]["slicing_efficiency"] == pytest.approx(1.0)
        dyn = res["dynamic"]
        assert sum(dyn["counts"]) == res["batch_size"] * dyn["calls_per_cycle"]
        pre, space, share = dyn["pre_gate_ms"], model.routing_space, [c / sum(dyn["counts"]) for c in dyn["counts"]]
        assert dyn["gate_mode"] == model.gate_mode
        head = model.gate_head_macs()
        if model.gate_mode == "pre":  # a choice: the shared part, then its own post-gate part
            assert dyn["pre_part_ms"] is None
            expect = pre + sum(w * (rows[k]["static_ms"] - pre) for w, k in zip(share, space))
            choice_macs = [macs[k] + head for k in space]
        else:  # every sample pays the slimmest and the exit head; a wider choice adds its post-gate part
            part = dyn["pre_part_ms"]
            assert 0 < part and "exit head" in format_report(report)
            expect = pre + sum(w * (rows[k]["static_ms"] - part) for w, k in zip(share[1:], space[1:]))
            trunk = model.pre_gate_macs(report["input_size"])
            choice_macs = [macs[space[0]] + head] + [macs[space[0]] + macs[k] - trunk + head for k in space[1:]]
        assert dyn["predicted_ms"] == pytest.approx(expect)
        assert dyn["latency_ms"] > 0 and dyn["vs_predicted"] == pytest.approx(dyn["latency_ms"] / expect)
        assert dyn["mean_macs"] == pytest.approx(sum(w * m for w, m in zip(share, choice_macs)))
        assert dyn["theoretical_speedup"] == pytest.approx(macs[w] / dyn["mean_macs"])
        assert dyn["real_speedup"] == pytest.approx(rows[w]["sliced_ms"] / dyn["latency_ms"])
        assert dyn["efficiency"] == pytest.approx(dyn["real_speedup"] / dyn["theoretical_speedup"])
        # the static networks it routes to, each routed group as one batch, on the same MACs' scale
        cycle = dyn["calls_per_cycle"]
        grouped_macs = sum(c * macs[k] for c, k in zip(dyn["counts"], space)) / cycle
        assert dyn["grouped_static_macs"] == pytest.approx(grouped_macs)
        per_mac = (dyn["latency_ms"] / (dyn["mean_macs"] * res["batch_size"])) / (
            dyn["grouped_static_ms"] / grouped_macs
        )
        assert dyn["grouped_static_ms"] > 0 and dyn["per_mac_vs_grouped_static"] == pytest.approx(per_mac)
        assert "each group as one batch" in format_report(report)


@pytest.mark.parametrize("gate_mode", ["exit", "pre"])
def test_run_benchmark_report_schema(gate_mode):
    model = dsnet.create_model("ds_mobilenet_v1_cifar", gate_mode=gate_mode)
    config = BenchConfig(batch_sizes=[1, 4], threads=1, repeats=2, warmup=0, input_size=(3, 16, 16))
    report = run_benchmark(model, config, model_name="ds_mobilenet_v1_cifar")
    _check_report(report, model)
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    assert report["results"][0]["dynamic"]["calls_per_cycle"] == 10
    assert "batch 4" in format_report(report)


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--model", "ds_resnet20_cifar", "--batch-sizes", "2", "--threads", "1", "--repeats", "2",
         "--warmup", "0", "--input-size", "16", "--subnets", "0,3", "--mix", "0.25,0.25,0.25,0.25", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["subnets"] == [0, 3] and report["command"].startswith("dsnet")
    assert "efficiency" in capsys.readouterr().out
    assert main(["bench", "--model", "ds_resnet20_cifar", "--subnets", "99"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_bench_times_the_gate_mode_asked_for(tmp_path, capsys):
    args = ["--batch-sizes", "2", "--threads", "1", "--repeats", "2", "--warmup", "0", "--input-size", "16"]
    args += ["--subnets", "0", "--no-masked"]
    modes = {}
    for mode in ("pre", "exit", None):
        out = tmp_path / f"{mode}.json"
        extra = [] if mode is None else ["--gate-mode", mode]
        assert main(["bench", "--model", "ds_resnet20_cifar", *extra, *args, "--json", str(out)]) == 0
        modes[mode] = json.loads(out.read_text())["results"][0]["dynamic"]
    assert modes["pre"]["gate_mode"] == "pre" and modes["pre"]["pre_part_ms"] is None
    assert modes["exit"]["gate_mode"] == modes[None]["gate_mode"] == "exit"  # the default
    assert modes["exit"]["mean_macs"] > modes["pre"]["mean_macs"]  # the same mix pays the slimmest for everyone
    capsys.readouterr()
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, {"model": {"name": "ds_resnet20_cifar", "kwargs": {}}, "state_dict": {}})
    assert main(["bench", "--checkpoint", str(ckpt), "--gate-mode", "pre"]) == 2
    err = capsys.readouterr().err
    assert "--gate-mode applies to --model" in err and len(err.strip().splitlines()) == 1
