"""The ONNX bundle's batch-1 path: one image gets the same logits and decision as inside a batch, with any thread
count; the thread count is picked by measurement; the serving runtime's static networks get the same treatment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dsnet
from tests.conftest import perturb

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dsnet.export.onnx import OnnxDynamicModel, export_dynamic, interleaved_medians  # noqa: E402
from dsnet.export.serving import OnnxServing  # noqa: E402


@pytest.fixture(scope="module", params=["pre", "exit"])
def bundle_of(request, tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(dsnet.create_model("ds_resnet8_tiny", num_classes=4, in_chans=1, gate_mode=request.param)).eval()
    folder = tmp_path_factory.mktemp(f"b1_{request.param}")
    manifest = export_dynamic(model, folder / "dynamic.onnx", input_size=(1, 28, 28))
    return model, manifest


def _images(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 1, 28, 28)).astype(np.float32)


def test_one_image_matches_its_row_in_a_batch(bundle_of):
    model, manifest = bundle_of
    x = _images()
    n = len(model.routing_space)
    for threads, batch1 in ((1, None), (2, 1), (2, None)):
        bundle = OnnxDynamicModel(manifest, threads, batch1_threads=batch1)
        assert bundle.batch1_threads == (batch1 or threads)
        for kwargs in ({}, {"bias": 0.7}, {"gate_bias": [0.0] * (n - 1) + [3.0]}):
            logits, choice = bundle(x, **kwargs)
            for i in range(len(x)):
                one, c = bundle(x[i : i + 1], **kwargs)
                assert c.shape == (1,) and c.dtype == np.int64 and int(c[0]) == int(choice[i])
                np.testing.assert_allclose(one[0], logits[i], atol=1e-5)
        forced = np.arange(len(x)) % n  # every routed graph, exit mode's choice 0 (the pre-gate's answer) included
        logits, _ = bundle(x, choice=forced)
        for i in range(len(x)):
            one, c = bundle(x[i : i + 1], choice=forced[i : i + 1])
            assert int(c[0]) == forced[i]
            np.testing.assert_allclose(one[0], logits[i], atol=1e-5)
    with torch.inference_mode():
        eager = model(torch.from_numpy(x[:1]), return_routing=True)
    one, c = OnnxDynamicModel(manifest, 1)(x[:1])
    assert int(c[0]) == int(eager.choice[0]) and float(np.abs(one - eager.logits.numpy()).max()) < 1e-4


def test_batch1_threads_get_sessions_of_their_own(bundle_of):
    _, manifest = bundle_of
    bundle = OnnxDynamicModel(manifest, 2)
    assert bundle._batch1[0] is bundle.pre
    bundle.set_batch1_threads(1)
    pre1, post1 = bundle._batch1
    assert pre1 is not bundle.pre and pre1.get_session_options().intra_op_num_threads == 1
    assert bundle.pre.get_session_options().intra_op_num_threads == 2
    assert [p is None for p in post1] == [p is None for p in bundle.post]
    bundle.set_batch1_threads(2)
    assert bundle._batch1[0] is bundle.pre
    with pytest.raises(ValueError, match="at least 1"):
        bundle.set_batch1_threads(0)


def test_tune_keeps_the_faster_count(bundle_of):
    _, manifest = bundle_of
    bundle = OnnxDynamicModel(manifest, 2)
    report = bundle.tune_batch1_threads(rounds=3, calls=4)
    ms = report["ms_per_call"]
    assert set(ms) == {1, 2} and all(v > 0 for v in ms.values())
    assert report["batch1_threads"] == bundle.batch1_threads == min(ms, key=ms.__getitem__)
    assert bundle._batch1[0].get_session_options().intra_op_num_threads == bundle.batch1_threads


def test_interleaved_medians_times_every_key_in_turn():
    seen: list[str] = []
    ms = interleaved_medians({"a": lambda i: seen.append("a"), "b": lambda i: seen.append("b")}, rounds=3, per_round=2)
    assert set(ms) == {"a", "b"}
    assert seen == ["a", "b"] + ["a", "a", "b", "b"] * 3  # one warm-up call each, then rounds in turn


def test_serving_runtime_tunes_batch1_and_its_static_networks(bundle_of, tmp_path):
    model, manifest = bundle_of
    if model.gate_mode != "exit":
        pytest.skip("the recipe's gate is enough here: an export per case costs seconds")
    server = OnnxServing(model, threads=2, folder=tmp_path, input_size=(1, 28, 28))
    assert server.batch1_tuning is not None and server.batch1_tuning["batch1_threads"] in (1, 2)
    assert server.bundle.batch1_threads == server.batch1_tuning["batch1_threads"]
    x = torch.from_numpy(_images(6))
    widest = server.static_network(model.routing_space[-1])
    batch = widest(x)
    for i in range(len(x)):
        np.testing.assert_allclose(widest(x[i : i + 1])[0], batch[i], atol=1e-5)
    routed = server.route(x)
    for i in range(len(x)):
        one = server.route(x[i : i + 1])
        assert int(one.choice[0]) == int(routed.choice[i])
        np.testing.assert_allclose(one.logits[0].numpy(), routed.logits[i].numpy(), atol=1e-5)
    fixed = OnnxServing(manifest, threads=2, batch1_threads=1)  # an exported bundle: no export, no tuning
    assert fixed.batch1_tuning is None and fixed.bundle.batch1_threads == 1 and "batch 1: 1" in fixed.describe()
    assert "4 sessions" in fixed.describe()  # exit mode: choice 0 is the pre-gate graph's answer
    with pytest.raises(ValueError, match="batch1_threads"):
        OnnxServing(manifest, threads=2, batch1_threads="fast")
