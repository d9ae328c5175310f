"""The serving paths: eager, eager split, compiled split and the ONNX bundle route and answer as eager does.

Also the per-call overheads of eager dynamic inference: no host-to-device copy of the knob's bias per call, no
per-call cast of a weight under autocast.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

import dsnet
from dsnet.bench.serving import format_serving_report, measure_runtimes, serving_model
from dsnet.export import serving as serving_mod
from dsnet.export.serving import (
    AUTO_RUNTIME,
    RUNTIMES,
    EagerServing,
    SplitServing,
    auto_runtime,
    build_serving,
    check_serving,
)
from dsnet.export.split import split_dynamic
from tests.conftest import perturb

BIASES = (-2.0, -0.5, 0.0, 0.5, 2.0)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serving_paths.json"


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2.5 + 0.25
    return torch.randn(n, 3, 28, 28, generator=g) * scale + torch.randn(n, 1, 1, 1, generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # the weights, so that the gate's spread over these images is known
    return perturb(dsnet.create_model("ds_resnet8_tiny", gate_mode="pre"))  # exit mode: the tests further down


@pytest.fixture(scope="module")
def split(model):
    return SplitServing(model)


@pytest.fixture(scope="module")
def compiled(model):
    return SplitServing(model, compile={"backend": "eager"})  # dynamo + the eager backend: compiles fast


def _spread(model, x: torch.Tensor, bias: float = 0.0) -> int:
    with torch.inference_mode():
        choice = model(x, return_routing=True, gate_bias=bias * model.bias_direction()).choice
    return len(set(choice.tolist()))


def test_split_parts_are_plain_folded_graphs_equal_to_the_model(model, split):
    x = _images(8)
    graphs = [split.split.pre, *split.split.posts()]
    for gm in graphs:
        assert isinstance(gm, torch.fx.GraphModule)
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert not any("batch_norm" in t for t in targets), targets  # every BatchNorm folded into its conv
        assert not [m for m in gm.modules() if m is not gm]  # no submodule at all: weights are buffers
    with torch.inference_mode():
        h, z = model.forward_pre(x, model.routing_space[0])
        want_logits, _ = model.gate_logits(h, z)
        got_h, got_logits = split.split.pre(x)
        torch.testing.assert_close(got_h, h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        for j, k in enumerate(model.routing_space):
            torch.testing.assert_close(split.split.posts()[j](h), model.forward_post(h, k), rtol=1e-5, atol=1e-5)
    # compact: the widest post-gate network holds fewer bytes than the supernet
    own = sum(b.numel() for b in split.split.posts()[-1].buffers())
    assert own < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("runtime", ["eager", "eager-split", "compile"])
def test_torch_runtimes_route_and_answer_as_eager_at_every_bias(model, split, compiled, runtime):
    server = {"eager": EagerServing(model), "eager-split": split, "compile": compiled}[runtime]
    x = _images(48)
    assert _spread(model, x) >= 2  # groups of several sizes: gather and scatter are exercised
    check = check_serving(server, model, x, biases=BIASES)
    assert check["routing_agrees"], check
    assert check["max_abs_diff"] < 1e-4, check
    assert server.bias == 0.0  # restored
    server.bias = 0.5
    out = server.route(x)
    with torch.inference_mode():
        ref = model(x, return_routing=True, gate_bias=0.5 * model.bias_direction())
    assert torch.equal(out.choice, ref.choice)
    torch.testing.assert_close(server(x), ref.logits, rtol=1e-4, atol=1e-4)
    server.bias = 0.0
    with pytest.raises(ValueError, match="bias must be a finite number"):
        server.bias = float("nan")


def test_varying_group_sizes_compile_a_bounded_number_of_graphs(model, compiled, split):
    """dynamic=True: every network compiles for batch 1, 2-15 and 16+ at build time, and never again."""
    built = compiled.compiled_graphs[0]
    assert 0 < built <= 3 * (1 + len(model.routing_space))
    assert compiled.compile_seconds > 0
    for n in (1, 2, 3, 5, 7, 11, 17, 23, 40, 1):
        x = _images(n, seed=n)
        for bias in (-1.0, 0.0, 1.0):
            compiled.bias = bias
            split.bias = bias
            a, b = compiled.route(x), split.route(x)
            assert torch.equal(a.choice, b.choice)
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    compiled.bias = split.bias = 0.0
    assert compiled.compiled_graphs[0] == built  # groups of every size reused the warm-up's graphs


def test_exit_mode_split_serves_choice_0_from_the_pre_gate_part():
    torch.manual_seed(0)
    model = perturb(dsnet.create_model("ds_resnet8_tiny", gate_mode="exit"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a strong random exit head: some images exit at choice 0, others go on
        for p in model.exit_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 10.0)
    server = SplitServing(model)
    assert server.split.posts()[0] is None
    x = _images(32)
    with torch.inference_mode():
        choice = model(x, return_routing=True).choice
    assert 0 in choice.tolist() and len(set(choice.tolist())) >= 2
    check = check_serving(server, model, x, biases=(-1.0, 0.0, 1.0))
    assert check["routing_agrees"] and check["max_abs_diff"] < 1e-4, check


def test_onnx_runtime_routes_and_answers_as_eager(model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    server = build_serving(model, "onnx", threads=1)
    x = _images(40)
    check = check_serving(server, model, x, biases=BIASES)
    assert check["routing_agrees"] and check["max_abs_diff"] < 1e-4, check
    out = server.route(x.numpy())  # numpy in works too
    assert out.logits.shape == (40, model.num_classes) and out.choice.dtype == torch.int64
    assert "5 sessions, 1 threads" in server.describe()
    widest = server.static_network(model.routing_space[-1])  # the same runtime's static network
    with torch.inference_mode():
        want = model(x, subnet=model.routing_space[-1])
    assert abs(torch.from_numpy(widest(x)) - want).max() < 1e-4


def test_serving_model_from_a_checkpoint_auto_and_bad_runtime(model, tmp_path, monkeypatch):
    import dsnet.bench.serving as bench_serving
    from dsnet.train.checkpoint import save_checkpoint

    ckpt = tmp_path / "gate.ckpt"
    save_checkpoint(ckpt, {"model": {"name": "ds_resnet8_tiny", "kwargs": {}}, "state_dict": model.state_dict()})
    with pytest.raises(ValueError, match="runtime must be one of eager, eager-split, compile, onnx, auto, measure"):
        serving_model(ckpt, runtime="tensorrt")
    try:
        serving_model(ckpt, runtime="fast")
    except ValueError as err:
        assert "\n" not in str(err)
    # auto: the table's first runtime that is installed; "onnx" pretended missing here, so that no export runs
    monkeypatch.setattr(serving_mod, "_available", lambda runtime, device: runtime != "onnx")
    server = serving_model(ckpt, batch_size=1)
    want = next(r for r in auto_runtime("cpu", 1) if r != "onnx")
    assert server.runtime == want
    x = _images(16)
    check = check_serving(server, model, x, biases=(0.0, 1.0))
    assert check["routing_agrees"] and check["max_abs_diff"] < 1e-4
    monkeypatch.setitem(AUTO_RUNTIME["cpu"], "throughput", ("eager",))
    assert serving_model(model, batch_size=256).runtime == "eager"
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        serving_model(model, batch_size=0)
    with pytest.raises(ValueError, match="allocator must be one of steady, system, got 'jemalloc'"):
        serving_model(model, allocator="jemalloc")
    called: list[int] = []
    monkeypatch.setattr(bench_serving, "steady_allocator", lambda: called.append(1) or True)
    serving_model(model, runtime="eager", allocator="system")
    assert called == []
    serving_model(model, runtime="eager")  # the default: steady
    assert called == [1]


def test_auto_table_names_real_runtimes_and_agrees_with_the_committed_measurement():
    for device in AUTO_RUNTIME.values():
        for order in device.values():
            assert order and set(order) <= set(RUNTIMES)
            assert "eager" in order  # always something to fall back on
    if not RESULTS.is_file():
        pytest.skip(f"{RESULTS} not measured yet (benchmarks/serving_paths.py)")
    report = json.loads(RESULTS.read_text())
    for res in report["results"]:
        measured = set(r["runtime"] for r in res["runtimes"])
        first = next(r for r in auto_runtime("cpu", res["batch_size"]) if r in measured)
        assert first == res["fastest"], (res["batch_size"], first, res["fastest"])


def test_measure_picks_the_fastest_of_the_candidates(model):
    x = _images(8)
    server = serving_model(model, "measure", images=x, batch_size=2, candidates=("eager", "eager-split"), repeats=2)
    m = server.measurement
    assert server.runtime == m["fastest"] and set(m["ms_per_image"]) == {"eager", "eager-split"}
    assert m["vs_second"]["rounds"] == 2 and not m["vs_second"]["clear"]  # two rounds never claim
    with pytest.raises(ValueError, match="candidates must be among"):
        serving_model(model, "measure", images=x, candidates=("tvm",))
    single = measure_runtimes({"eager": EagerServing(model)}, x, 1, repeats=1, warmup=0)
    assert single["fastest"] == "eager" and "vs_second" not in single


def test_format_serving_report_marks_noisy_claims():
    claim = {"speedup": 1.5, "ratio_q1": 0.9, "ratio_q3": 2.0, "rounds": 3, "clear": False}
    row = {
        "runtime": "eager",
        "dynamic_ms": 1.0,
        "widest_ms": 1.5,
        "speedup_vs_widest": claim,
        "speedup_vs_eager_widest": {**claim, "clear": True},
        "time_per_mac_ratio": 1.05,
    }
    report = {
        "machine": {"cpu": "cpu", "threads": 2, "torch": "2", "onnxruntime": "1"},
        "build": {"eager": {"build_seconds": 0.0, "compiled_graphs": None}},
        "results": [
            {
                "batch_size": 1,
                "mix": [0.5, 0.5],
                "rounds": 3,
                "eager_widest_ms": 1.5,
                "runtimes": [row],
                "fastest": "eager",
            }
        ],
    }
    text = format_serving_report(report)
    assert (
        "| eager | 1.000 | 1.500 | 1.50x? | 1.50x | 1.05x |" in text
        and "Fastest dynamic model at batch 1: eager" in text
    )


@pytest.mark.parametrize("gate_mode", ["pre", "exit"])
def test_split_in_bfloat16_casts_its_weights_once(model, gate_mode):
    if gate_mode == "exit":  # its graph casts to float32 and back (the exit head): traced in bfloat16
        torch.manual_seed(0)
        model = perturb(dsnet.create_model("ds_resnet8_tiny", gate_mode="exit"))
    server = SplitServing(model, dtype=torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in server.split.buffers())
    x = _images(8)
    out = server(x)
    assert out.dtype == torch.bfloat16
    with torch.inference_mode():
        ref = model(x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_split_needs_eval_mode(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            split_dynamic(model)
    finally:
        model.eval()


# ------------------------------------------------------------------ per-call overheads of eager dynamic inference
def test_route_converts_a_list_bias_once_not_per_call(model, monkeypatch):
    x = _images(6)
    bias = [0.3, 0.1, -0.1, -0.3]
    with torch.inference_mode():
        first = model(x, return_routing=True, gate_bias=bias)
        model(x, return_routing=True, gate_bias=bias)  # the routed plan is built on the second call (once)
    calls = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append(a) or real(*a, **k))
    with torch.inference_mode():
        for _ in range(3):
            again = model(x, return_routing=True, gate_bias=bias)
    assert calls == []  # no tensor built per call: the checked device tensor is kept
    assert torch.equal(again.choice, first.choice) and torch.equal(again.gate_logits, first.gate_logits)
    monkeypatch.undo()
    with torch.no_grad():  # the kept tensor is a normal one: usable outside inference mode
        torch.testing.assert_close(model(x, return_routing=True, gate_bias=bias).logits, first.logits)
    with pytest.raises(ValueError, match="gate_bias must be finite"):
        model(x, gate_bias=[0.0, float("inf"), 0.0, 0.0])
    with pytest.raises(ValueError, match="one value per routing choice"):
        model(x, gate_bias=[0.0, 1.0])


def test_dynamic_inference_under_autocast_casts_no_weight_per_call(model):
    from torch.profiler import ProfilerActivity, profile

    x = _images(5)  # batch 5: no activation has a weight's shape

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, gate_bias=[0.2, 0.0, 0.0, -0.2])

    first = run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        again = run()
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() > 0}
    cast = [tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes]
    assert not [s for s in cast if s in weights], cast  # the gate head included (it used to cast every call)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile")
def test_one_real_inductor_compile_serves_as_eager(model):
    """The tiniest real compile: the pre-gate part and the widest post-gate network, inductor on the CPU."""
    t0 = time.perf_counter()
    server = SplitServing(model, compile={}, warmup=())
    server.bias = -100.0  # every image to the widest choice: two graphs compile, not fifteen
    x = _images(8)
    out = server.route(x)
    with torch.inference_mode():
        ref = model(x, return_routing=True, gate_bias=-100.0 * model.bias_direction())
    assert torch.equal(out.choice, ref.choice) and set(out.choice.tolist()) == {len(model.routing_space) - 1}
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert server.compiled_graphs[0] == 2
    assert "compile (dynamic=True" in server.describe()
    print(f"inductor: 2 graphs in {time.perf_counter() - t0:.1f} s")


def test_dataclass_output(model, split):
    out = split.route(_images(3))
    assert dataclasses.fields(out)[0].name == "logits" and out.choice.shape == (3,)


def test_bench_serving_paths_end_to_end_on_a_tiny_run():
    """The benchmark behind AUTO_RUNTIME, one round (no timing claim): the report's rows and the markdown."""
    from dsnet.bench.serving import bench_serving_paths

    torch.manual_seed(0)
    model = perturb(dsnet.create_model("ds_resnet8_tiny", routing_space=[0, 3]))  # two choices: fewer exports
    x = _images(16)
    runtimes = ("eager", "eager-split", "compile")
    report = bench_serving_paths(
        model, x, runtimes=runtimes, batch_sizes=(1, 8), batch1_images=4, repeats=1, warmup=0,
        compile={"backend": "eager"},
    )  # fmt: skip
    assert report["schema"] == "dsnet-serving-paths-v1" and report["routing_space"] == model.routing_space
    for name in runtimes:
        assert report["build"][name]["check"]["routing_agrees"]
    assert report["build"]["compile"]["compiled_graphs"] > 0
    for res, batch in zip(report["results"], (1, 8)):
        assert res["batch_size"] == batch and res["calls_per_round"] == (4 if batch == 1 else 1)
        assert sum(res["counts"]) == (4 if batch == 1 else 8) and res["fastest"] in runtimes
        rows = {r["runtime"]: r for r in res["runtimes"]}
        assert set(rows) == set(runtimes)
        for r in rows.values():
            assert r["dynamic_ms"] > 0 and r["widest_ms"] > 0 and len(r["static_ms"]) == len(model.routing_space)
            assert r["time_per_mac_ratio"] > 0 and not r["speedup_vs_widest"]["clear"]  # one round
            assert r["speedup_vs_widest"]["speedup"] == pytest.approx(r["widest_ms"] / r["dynamic_ms"])
            # per MAC against the static networks on the gate's own groups (at batch 1: the mix-weighted statics)
            routing = [float(v) for v in model.routing_macs(x.shape[1:])]
            mean_macs = sum(c * m for c, m in zip(res["counts"], routing)) / sum(res["counts"])
            static_macs = sum(c * m for c, m in zip(res["counts"], report["subnet_macs"])) / sum(res["counts"])
            expected = (r["dynamic_ms"] / mean_macs) / (r["grouped_static_ms"] / static_macs)
            assert r["time_per_mac_vs_grouped"] == pytest.approx(expected)
            if batch == 1:
                assert r["time_per_mac_vs_grouped"] == pytest.approx(r["time_per_mac_ratio"])
    assert report["machine"]["allocator"] in ("steady", "system")
    text = format_serving_report(report)
    assert "time/MAC vs its routed groups" in text
    assert text.count("| eager-split |") == 2 and "graphs compiled in" in text


def test_inference_cache_of_the_routing_space_is_as_documented(model):
    """set_inference_cache's docstring: serving the routing space holds at most ~1.8x the parameters again."""
    model.clear_inference_cache()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        for k in model.routing_space:
            model(_images(2), subnet=k)
    routed = model.inference_cache_bytes()
    assert params < routed < 2 * params
    model.set_inference_cache(max_bytes=routed // 2)
    with torch.inference_mode():
        for _ in range(2):
            model(_images(16))
            assert model.inference_cache_bytes() <= routed // 2
    model.set_inference_cache()
