"""Serving the dynamic model with ONNX Runtime: session options, a self-describing manifest, the bench.

Also the bench's noise rule and the exporter's silenced torchvision notices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import numpy as np
import pytest
import torch

import dsnet
from dsnet.bench import BenchConfig, format_report, run_benchmark
from dsnet.bench.timing import speedup_claim
from dsnet.cli import main
from dsnet.data import build_dataset, build_loader
from dsnet.train.checkpoint import save_checkpoint
from tests.conftest import perturb

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dsnet.export.onnx import OnnxDynamicModel, _quiet_exporter, ort_session  # noqa: E402

DATA = {"dataset": "synthetic", "workers": 0, "eval_batch_size": 16, "synthetic": {"num_classes": 4, "num_val": 16}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint of ds_resnet8_tiny on synthetic data, exported as a bundle with the CLI (once per module)."""
    tmp = tmp_path_factory.mktemp("serving")
    _, info = build_dataset(DATA, "train")
    model = perturb(dsnet.create_model("ds_resnet8_tiny", num_classes=4, in_chans=1, gate_mode="pre"))
    ckpt = tmp / "gate.ckpt"
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 4, "in_chans": 1}}
    save_checkpoint(ckpt, {"model": spec, "state_dict": model.state_dict(), "dataset": dataclasses.asdict(info)})
    return {"model": model, "info": info, "ckpt": ckpt, "out": tmp / "dynamic.onnx"}


def test_export_from_checkpoint_records_preprocessing_and_class_names(exported, capfd):
    assert main(["export", "--checkpoint", str(exported["ckpt"]), "--out", str(exported["out"])]) == 0
    out, err = capfd.readouterr()
    assert "check OK" in out and "preprocessing and 4 class names" in out
    assert "torchvision is not installed" not in err and "LeafSpec" not in err  # silenced for each of 5 graphs
    info = exported["info"]
    manifest = json.loads(exported["out"].with_suffix(".manifest.json").read_text())
    pre = manifest["preprocessing"]
    assert manifest["class_names"] == info.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert pre["input_size"] == [1, 28, 28] and pre["layout"] == "NCHW" and pre["color"] == "L"
    assert pre["mean"] == list(info.mean) and pre["std"] == list(info.std) and pre["resize_shorter_side"] == 28
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(exported["out"])).metadata_props}
    assert json.loads(meta["dsnet.class_names"]) == info.class_names
    assert json.loads(meta["dsnet.preprocessing"]) == pre


def test_bundle_sessions_and_preprocess_serve_like_eager(exported):
    if not exported["out"].is_file():
        pytest.skip("needs the export test's bundle")
    bundle = OnnxDynamicModel(exported["out"], threads=1)
    for session in [bundle.pre, *bundle.post]:  # 5 sessions taking turns: no spinning, fixed threads
        opts = session.get_session_options()
        assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert bundle.class_names == exported["info"].class_names
    # raw uint8 images + the manifest's preprocessing == the eval loader's input; bundle output == eager
    raw, _ = build_dataset(DATA, "val")
    x, _ = next(iter(build_loader(DATA, "val")[0]))
    served = bundle.preprocess(raw.images.numpy())
    assert np.abs(served - x.numpy()).max() < 1e-6
    logits, choice = bundle(served)
    with torch.inference_mode():
        eager = exported["model"](x, return_routing=True)
    assert np.abs(logits - eager.logits.numpy()).max() < 1e-4 and (choice == eager.choice.numpy()).all()
    with pytest.raises(ValueError, match="expected uint8 images of shape"):
        bundle.preprocess(raw.images.numpy()[:, :, :20])
    spinning = ort_session(exported["out"], 1, spinning=True).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_bench_onnx_reports_the_dynamic_bundle_at_batch_1_and_32(exported, monkeypatch, capsys):
    """``dsnet bench --onnx``: the bundle against its widest sub-network (the bundle export reused, not redone)."""
    if not exported["out"].is_file():
        pytest.skip("needs the export test's bundle")
    import dsnet.bench.runner as runner

    monkeypatch.setattr(
        runner, "export_bench_bundle", lambda model, folder, size, threads: OnnxDynamicModel(exported["out"], threads)
    )
    out = exported["out"].parent / "bench.json"
    argv = ["bench", "--checkpoint", str(exported["ckpt"]), "--batch-sizes", "1,32", "--threads", "1", "--onnx"]
    argv += ["--repeats", "2", "--warmup", "0", "--subnets", "3", "--no-masked", "--json", str(out)]
    argv += ["--mix", "0.4,0.3,0.2,0.1"]  # this checkpoint records no data to measure its own routing on
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    for res, batch in zip(report["results"], (1, 32)):
        onnx = res["onnx_dynamic"]
        assert res["batch_size"] == batch and onnx["samples_per_call"] == batch
        assert onnx["calls_per_cycle"] == (10 if batch == 1 else 1) and sum(onnx["counts"]) == batch * (
            10 if batch == 1 else 1
        )
        assert onnx["latency_ms"] > 0 and onnx["widest_ms"] > 0
        assert onnx["real_speedup"] == pytest.approx(onnx["widest_ms"] / onnx["latency_ms"])
        assert onnx["mean_macs"] == pytest.approx(res["dynamic"]["mean_macs"])  # one cost model, either gate mode
        assert onnx["session"] == {"intra_op_threads": 1, "allow_spinning": "0", "sessions": 5}
        assert onnx["real_speedup_claim"]["rounds"] == 2 and not onnx["real_speedup_claim"]["clear"]  # 2 rounds
    assert text.count("ONNX Runtime dynamic bundle (5 sessions, 1 threads, no spinning)") == 2
    assert "too noisy to claim" in text


def test_noise_rule_on_speedups():
    steady = speedup_claim([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8], [5.0, 5.1, 5.0, 4.9, 5.2, 5.0, 5.1])
    assert steady.clear and steady.speedup == pytest.approx(10.0 / 5.05, rel=0.02) and steady.ratio_q1 > 1.9
    # a median ratio of 1.2, but the rounds disagree: a spread larger than the effect
    noisy = speedup_claim([12, 5, 14, 6, 13, 5, 12.0], [6, 12, 5, 13, 7, 11, 10.0])
    assert noisy.speedup == pytest.approx(12 / 10) and not noisy.clear and noisy.ratio_q1 < 1 < noisy.ratio_q3
    assert speedup_claim([5.0] * 7, [10.0] * 7).clear  # a clear slow-down is a clear result too
    assert not speedup_claim([10.0] * 4, [5.0] * 4).clear  # too few rounds to claim anything
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        speedup_claim([1.0], [1.0, 2.0])
    model = dsnet.create_model("ds_resnet8_tiny")
    report = run_benchmark(model, BenchConfig(batch_sizes=[2], threads=1, repeats=3, warmup=0, masked=False))
    rows = report["results"][0]["per_subnet"]
    assert rows[-1]["real_speedup_claim"] is None  # the widest is the reference
    assert all(not r["real_speedup_claim"]["clear"] for r in rows[:-1])  # 3 rounds: never enough
    text = format_report(report)
    assert "x?" in text and "? = too noisy to claim" in text and "too noisy to claim (per-round ratios" in text


def test_quiet_exporter_drops_only_the_torchvision_notice():
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _quiet_exporter():
                logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
                logger.warning("something that matters")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
                warnings.warn("also matters", UserWarning, stacklevel=1)
            logger.warning("torchvision is not installed. Skipping after")  # outside: untouched
    finally:
        logger.removeHandler(handler)
    assert seen == ["something that matters", "torchvision is not installed. Skipping after"]
    assert [str(w.message) for w in caught] == ["also matters"]
