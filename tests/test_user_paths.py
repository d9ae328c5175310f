"""The library-user paths (issue 19): your own network and your own weights through dsnet."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dsnet
from dsnet.cli import main
from dsnet.convert import FxDynamicNet, make_dynamic
from tests.reference_nets import randomize
from tests.test_convert import ResidualCNN

FACTORY = "tests.test_user_paths:make_user_resnet"
TINY = [
    f"model.name={FACTORY}",
    "data.dataset=synthetic",
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=32",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=16",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "data.workers=0",
    "supernet.epochs=1",
    "supernet.warmup_epochs=0",
    "supernet.bn_calibration_batches=1",
    "gate.epochs=1",
    "log.progress=false",
    "log.tensorboard=false",
]


def make_user_resnet(num_classes: int = 10, in_chans: int = 1, **options) -> nn.Module:
    """A user's factory: their own residual CNN made dynamic; routing options (gate_mode, ...) passed on."""
    return make_dynamic(
        ResidualCNN(in_chans, num_classes), torch.zeros(2, in_chans, 16, 16), gate_after="layer2", **options
    )


def _sets(*extra: str) -> list[str]:
    out = []
    for item in [*TINY, *extra]:
        out += ["--set", item]
    return out


# ---------------------------------------------------------------- 1. converted networks get every router
def test_make_dynamic_takes_the_exit_gate():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    net = randomize(ResidualCNN())
    pre = make_dynamic(net, x, gate_after="layer2", gate_mode="pre").eval()
    exit_ = make_dynamic(net, x, gate_after="layer2").eval()  # the default with two or more choices
    assert pre.exit_head is None and exit_.gate_mode == "exit" and exit_.exit_head is not None
    with torch.no_grad():  # same weights: every sub-network agrees; routing runs the early-exit head
        for k in range(len(pre.subnets)):
            torch.testing.assert_close(exit_(x, subnet=k), pre(x, subnet=k), rtol=0, atol=0)
        r = exit_(x, return_routing=True)
    assert r.logits.shape == (4, 10) and r.gate_logits.shape == (4, len(exit_.routing_space))
    with pytest.raises(ValueError, match="gate_mode must be one of"):
        make_dynamic(net, x, gate_after="layer2", gate_mode="late")
    with pytest.raises(ValueError, match="unknown option.*no_such_option"):
        make_dynamic(net, x, gate_after="layer2", no_such_option=1)


def test_fashion_mnist_recipe_on_a_converted_network(tmp_path):
    """configs/fashion_mnist.yaml (gate.mode: exit) on a module:factory network: supernet, gate, eval, export."""
    cfg = str(Path(__file__).parent.parent / "configs" / "fashion_mnist.yaml")
    sets = [*_sets(), "--trust-factory", FACTORY]  # the checkpoints name the factory: building it runs its code
    assert main(["train", "supernet", "--config", cfg, *sets, "--out", str(tmp_path / "sup")]) == 0
    sup = tmp_path / "sup" / "best.ckpt"
    gate_out = tmp_path / "gate"
    assert main(["train", "gate", "--config", cfg, *sets, "--supernet", str(sup), "--out", str(gate_out)]) == 0
    ckpt = gate_out / "best.ckpt"
    model = dsnet.load(ckpt, trust_factories=[FACTORY]).model
    assert model.gate_mode == "exit" and isinstance(model, FxDynamicNet)
    report = tmp_path / "eval.json"
    trust = ["--trust-factory", FACTORY]
    assert (
        main(["eval", "--checkpoint", str(ckpt), "--sweep", "3", "--no-progress", "--json", str(report), *trust]) == 0
    )
    assert json.loads(report.read_text())
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", "--checkpoint", str(ckpt), "--subnet", "0", "--out", str(tmp_path / "s0.onnx"), *trust]) == 0


# ---------------------------------------------------------------- 5. loading what you trained
def _train_tiny(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """A tiny stage I + stage II (exit gate) run of ds_resnet8_tiny; returns the two checkpoints."""
    from dsnet.train.config import load_config
    from dsnet.train.gate import train_gate
    from dsnet.train.supernet import train_supernet

    sets = [s.replace(f"model.name={FACTORY}", "model.name=ds_resnet8_tiny") for s in TINY]
    sets = [s.replace("image_size=16", "image_size=28") for s in sets]
    cfg = load_config(None, [*sets, "gate.mode=exit", *extra])
    train_supernet(cfg, tmp_path / "sup")
    train_gate(cfg, tmp_path / "sup" / "best.ckpt", tmp_path / "gate")
    return tmp_path / "sup" / "best.ckpt", tmp_path / "gate" / "best.ckpt"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    return _train_tiny(tmp_path_factory.mktemp("tiny"))


def test_load_any_checkpoint_with_its_recipe(tiny_run):
    from dsnet.train.checkpoint import read_checkpoint

    sup, gate = tiny_run
    x = torch.randn(3, 1, 28, 28)
    for path, stage in ((sup, "supernet"), (gate, "gate")):
        loaded = dsnet.load(path)
        ckpt = read_checkpoint(path)
        assert loaded.stage == stage and not loaded.model.training
        assert loaded.recipe == ckpt["dataset"]["recipe"] and loaded.recipe["image_size"] == 28
        assert loaded.classes == ckpt["dataset"]["class_names"] and len(loaded.classes) == 10
        assert loaded.ema == (stage == "supernet")
        assert stage in loaded.describe() and "data recipe" in loaded.describe()
        weights = ckpt["ema_state_dict"] if loaded.ema else ckpt["state_dict"]
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, weights[k]), k
    assert dsnet.load(gate).model.gate_mode == dsnet.load(sup).model.gate_mode == "exit"  # the default head
    # create_model(name, checkpoint_path=<gate checkpoint>) takes the checkpoint's exit head, same function
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # done as the checkpoint records: nothing to warn about
        made = dsnet.create_model("ds_resnet8_tiny", in_chans=1, checkpoint_path=str(gate)).eval()
    assert made.gate_mode == "exit"
    with torch.no_grad():
        torch.testing.assert_close(made(x), dsnet.load(gate).model(x), rtol=0, atol=0)
    # a stage I checkpoint into an exit-gate model: the head keeps its initialisation, the rest loads
    fresh = dsnet.create_model("ds_resnet8_tiny", in_chans=1, gate_mode="exit", checkpoint_path=str(sup))
    ema = read_checkpoint(sup)["ema_state_dict"]
    own = fresh.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ema.items()) and any(k.startswith("exit_head.") for k in own)
    with pytest.raises(ValueError, match=r"dsnet\.load"):
        dsnet.create_model("ds_resnet8_tiny", in_chans=3, checkpoint_path=str(gate))


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable dsnet checkpoint"):
        dsnet.load(bad)


def test_make_dynamic_passes_routing_options_on():
    """Any routing option the DynamicNet base takes (here ``router``) reaches it, as for dsnet's own models."""
    import inspect

    from dsnet.models.base import DynamicNet

    if "router" not in inspect.signature(DynamicNet.__init__).parameters:
        pytest.skip("this DynamicNet has no router option")
    net = make_dynamic(ResidualCNN(), torch.zeros(2, 1, 16, 16), gate_after="layer2", router="utility")
    assert net.router == "utility"
    with pytest.raises(ValueError, match="router must be one of"):
        make_dynamic(ResidualCNN(), torch.zeros(2, 1, 16, 16), gate_after="layer2", router="nope")


# ---------------------------------------------------------------- 4. threads
@pytest.fixture
def thread_state(monkeypatch):
    """A fresh thread state for this test; torch's thread count restored after it."""
    from dsnet.utils import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_state", {"threads": None, "explicit": False, "warned": False})
    yield threads
    torch.set_num_threads(before)


def test_auto_threads_is_capped_and_shared(thread_state, monkeypatch):
    monkeypatch.setattr(thread_state.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_state.auto_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert thread_state.auto_threads() == 8
    monkeypatch.setattr(thread_state.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert thread_state.auto_threads() == 1  # 3 cores for 2 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert thread_state.auto_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the usual cap is honoured
    assert thread_state.auto_threads() == 2


def test_set_threads_once_command_line_wins(thread_state, monkeypatch):
    monkeypatch.setattr(thread_state.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(thread_state, "auto_threads", lambda: 2)
    assert thread_state.set_threads(None) == 2 and torch.get_num_threads() == 2  # auto
    assert thread_state.set_threads(3, override=False) == 3  # a config's value replaces auto
    assert thread_state.set_threads(1) == 1 and torch.get_num_threads() == 1  # --threads 1
    assert thread_state.set_threads(4, override=False) == 1  # ... and a config does not replace it
    assert thread_state.set_threads(None) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        thread_state.set_threads(0)


def test_oversubscribed_machine_is_one_warning_line(thread_state, monkeypatch):
    monkeypatch.setattr(thread_state.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(thread_state, "others_running", lambda: 4.0)
    said: list[str] = []
    thread_state.set_threads(1, warn=said.append)
    thread_state.set_threads(2, warn=said.append)  # once per process
    assert said == [
        "machine is oversubscribed: other processes' running threads 4.0 on 2 cores; timings will be unreliable; "
        "consider --threads 1"
    ]
    monkeypatch.setattr(thread_state, "others_running", lambda: 1.0)
    assert thread_state.oversubscription(1) is None and thread_state.oversubscription(2) is not None
    # where /proc does not say, the 1-minute load average stands in
    monkeypatch.setattr(thread_state, "others_running", lambda: None)
    monkeypatch.setattr(thread_state.os, "getloadavg", lambda: (4.5, 4.0, 3.0))
    assert thread_state.oversubscription(1).startswith("machine is oversubscribed: load 4.5 on 2 cores")


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads /proc")
def test_others_running_counts_other_processes_not_this_ones_threads(thread_state):
    """A check after the process's own work (a timing loop) must not see the machine as busy with itself."""
    import subprocess
    import sys
    import threading

    stop = threading.Event()

    def work() -> None:  # torch releases the GIL: both threads run at once
        a = torch.randn(256, 256)
        while not stop.is_set():
            a @ a

    own = [threading.Thread(target=work) for _ in range(2)]
    for t in own:
        t.start()
    try:
        with_own = thread_state.others_running(samples=9)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            with_other = thread_state.others_running(samples=9)
        finally:
            spinner.kill()
            spinner.wait()
    finally:
        stop.set()
        for t in own:
            t.join()
    assert with_own is not None and with_other is not None
    assert with_other >= 1  # another process's busy thread is seen
    assert with_own < 2  # ... and this process's two busy threads are not


def test_every_command_takes_threads(thread_state, capsys):
    from dsnet.cli import build_parser
    from dsnet.cli._args import leaf_parsers

    leaves = leaf_parsers(build_parser())
    progs = {p.prog for p in leaves}
    assert len(leaves) > 10 and {"dsnet eval", "dsnet train gate", "dsnet config reference"} <= progs
    assert not {"dsnet train", "dsnet config"} & progs  # the parsers that only dispatch are not leaves
    assert all("--threads" in p.format_help().split() for p in leaves)
    assert (
        main(["config", "show", str(Path(__file__).parent.parent / "configs" / "fashion_mnist.yaml"), "--threads", "1"])
        == 0
    )
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        main(["models", "--threads", "0"])
    assert "--threads: must be at least 1" in capsys.readouterr().err


def test_training_prints_its_thread_count(thread_state, tmp_path, capsys):
    from dsnet.train.config import load_config
    from dsnet.train.supernet import train_supernet

    cfg = load_config(None, [*TINY, "threads=1"])
    train_supernet(cfg, tmp_path / "sup")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[supernet] data recipe"))
    assert line.endswith("; torch threads: 1") and torch.get_num_threads() == 1


# ---------------------------------------------------------------- 9. hidden knobs, a fast `dsnet models`
def test_models_options_lists_constructor_options_with_defaults(capsys):
    from dsnet.cli.models import model_options

    family, rows = model_options("ds_resnet8_tiny")
    by = {r["option"]: r for r in rows}
    assert family == "DSResNet"
    for option in ("zero_init_residual", "gate_mode", "pre_gate_ratio", "stem_stride", "gate_se_ratio"):
        assert option in by
    assert by["stem_stride"]["value"] == "2" and by["stem_stride"]["class_default"] == "1"  # set by the factory
    assert by["gate_mode"]["value"] == "None" and by["zero_init_residual"]["value"] == "False"  # the factory's
    assert by["zero_init_residual"]["class_default"] == "True"
    assert main(["models", "--options", "ds_resnet8_tiny"]) == 0
    out = capsys.readouterr().out
    assert "stem_stride" in out and "DSResNet default" in out
    assert main(["models", "--options", "no_such_model"]) == 2


def test_models_summaries_are_cached_per_code_version(tmp_path, monkeypatch):
    from dsnet.cli import models

    monkeypatch.setenv("DSNET_CACHE", str(tmp_path))
    calls: list[str] = []

    def summarise(name: str) -> dict:
        calls.append(name)
        return {"model": name, "n": len(calls)}

    first = models.cached_summaries(["a", "b"], summarise)
    assert models.cached_summaries(["a", "b"], summarise) == first and calls == ["a", "b"]  # the second: cached
    assert models.cached_summaries(["a", "b"], summarise, use_cache=False) != first  # --no-cache recounts
    monkeypatch.setattr(models, "_code_digest", lambda: "other code")
    models.cached_summaries(["a"], summarise)
    assert calls == ["a", "b", "a", "b", "a"]  # edited code: counted again


# ---------------------------------------------------------------- 10. small things
def test_summaries_count_epochs_from_one_and_name_the_selection_split(tiny_run):
    from dsnet.train.checkpoint import read_checkpoint

    sup, gate = tiny_run
    for path in (sup, gate):
        summary = json.loads((path.parent / "summary.json").read_text())
        assert summary["best_epoch"] == read_checkpoint(path)["epoch"] + 1 == 1
    record = json.loads((gate.parent / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["selection_split"] == "holdout" and "holdout_top1" in record and "val_top1" not in record


def test_eval_says_what_it_evaluates(tiny_run, capsys):
    from dsnet.cli.eval import _say_what_no_ema_loads
    from dsnet.evaluation.text import _gate_label
    from dsnet.train.checkpoint import read_checkpoint

    assert _gate_label({"checkpoint_stage": "supernet"}).startswith("untrained gate")
    assert _gate_label({"checkpoint_stage": "gate"}) == "trained gate"
    sup, gate = tiny_run
    _say_what_no_ema_loads(str(gate), read_checkpoint(gate))
    assert "has no separate EMA weights" in capsys.readouterr().err
    ckpt = read_checkpoint(sup)
    _say_what_no_ema_loads(str(sup), {**ckpt, "ema_state_dict": dict(ckpt["state_dict"])})
    assert "equal its raw weights" in capsys.readouterr().err
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    _say_what_no_ema_loads(str(sup), {**ckpt, "ema_state_dict": ema})  # EMA weights that differ: nothing to say
    assert capsys.readouterr().err == ""


def test_only_the_main_rank_prints_the_summary(tmp_path, monkeypatch, capsys):
    import dsnet.train.supernet

    monkeypatch.setattr(dsnet.train.supernet, "train_supernet", lambda *a, **k: {"best_metric": -1.0})
    args = ["train", "supernet", "--set", "data.dataset=synthetic", "--out", str(tmp_path / "r")]
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0 and "best_metric" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0 and "best_metric" in capsys.readouterr().out


def test_config_show_prints_the_data_recipe(capsys):
    import yaml

    assert main(["config", "show", "--set", "data.dataset=synthetic", "--set", "data.synthetic.image_size=20"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("# data recipe (synthetic data's statistics): 20 px")
    assert yaml.safe_load(out)["data"]["dataset"] == "synthetic"  # still the config, as YAML
    assert main(["config", "show", "--set", "data.dataset=imagefolder"]) == 0  # no folder here: said, not fatal
    assert "data recipe: not measured here" in capsys.readouterr().out


# ---------------------------------------------------------------- 8. bench --checkpoint times the checkpoint's routing
def test_bench_checkpoint_uses_its_own_routing(tiny_run, monkeypatch, capsys):
    import dsnet.bench
    from dsnet.data import build_loader
    from dsnet.data.recipe import with_recorded_recipe
    from dsnet.train.checkpoint import read_checkpoint

    _, gate = tiny_run
    ckpt = read_checkpoint(gate)
    model = dsnet.load(gate).model
    # independently: the gate's choices on the held-out images the run selected on, with the recorded recipe
    loader, _ = build_loader(with_recorded_recipe(ckpt["config"]["data"], ckpt["dataset"]), "holdout", seed=0)
    with torch.no_grad():
        choices = torch.cat([model(x, return_routing=True).choice for x, _ in loader])
    want = [float(c) / len(choices) for c in torch.bincount(choices, minlength=len(model.routing_space))]
    seen = {}

    def fake_benchmark(model, config, model_name, log):  # noqa: ANN001 - no timing in tests
        seen["mix"] = config.mix
        return {"fake": True}

    monkeypatch.setattr(dsnet.bench, "run_benchmark", fake_benchmark)
    monkeypatch.setattr(dsnet.bench, "format_report", lambda report: "")
    assert main(["bench", "--checkpoint", str(gate), "--routing-images", "1000"]) == 0
    assert seen["mix"] == pytest.approx(want, abs=1e-12) and sum(seen["mix"]) == pytest.approx(1.0)
    assert "the checkpoint's gate on the first" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(gate), "--mix", "1,1,1,1"]) == 0
    assert seen["mix"] == [1.0, 1.0, 1.0, 1.0]  # --mix: the synthetic mix, as before


# ---------------------------------------------------------------- 7. extraction as the user's own network
class UserCNN(nn.Module):
    """The user's residual CNN with its widths as arguments (what they would build at a sub-network's widths)."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        from tests.test_convert import Block

        super().__init__()
        a, b, c = widths
        self.stem = nn.Sequential(nn.Conv2d(1, a, 3, 1, 1, bias=False), nn.BatchNorm2d(a), nn.ReLU())
        self.layer1 = nn.Sequential(Block(a, a, 1), Block(a, a, 1))
        self.layer2 = Block(a, b, 2)
        self.layer3 = Block(b, c, 2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_extract_source_is_the_users_network_at_narrower_widths():
    torch.manual_seed(7)
    x = torch.randn(4, 1, 16, 16)
    dyn = make_dynamic(randomize(UserCNN()), x, gate_after="layer2").eval()
    for k in (0, 2, dyn.largest):
        plain = dyn.extract_source(k)
        assert type(plain) is UserCNN
        assert all(not type(m).__module__.startswith("dsnet") for m in plain.modules())
        widths = (plain.stem[0].out_channels, plain.layer2.conv1.out_channels, plain.layer3.conv1.out_channels)
        mine = UserCNN(widths)
        mine.load_state_dict(plain.state_dict())  # strict: the same keys and shapes
        with torch.no_grad():
            torch.testing.assert_close(mine.eval()(x), dyn(x, subnet=k), rtol=1e-5, atol=1e-5)
    assert widths == (16, 32, 64)  # the largest: the original network
    with torch.no_grad():
        dyn.gate.expand.weight.add_(0.5)  # a trained gate attention: input-dependent, the user's forward lacks it
    with pytest.raises(ValueError, match="attention is no longer the identity"):
        dyn.extract_source(0)


def test_oversubscription_warning_only_where_timings_are_reported(thread_state, monkeypatch, capsys):
    import argparse

    from dsnet.cli._args import apply_common_arguments

    monkeypatch.setattr(thread_state.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(thread_state, "others_running", lambda: 6.0)
    apply_common_arguments(argparse.Namespace(command="train", threads=1))
    assert capsys.readouterr().err == ""  # a training's stderr stays its own
    thread_state._state["warned"] = False
    apply_common_arguments(argparse.Namespace(command="bench", threads=1))
    assert capsys.readouterr().err.startswith(
        "warning: machine is oversubscribed: other processes' running threads 6.0 on 2 cores"
    )


def test_evaluating_an_image_folder_needs_only_its_val_split(tmp_path):
    from PIL import Image

    from dsnet.data import build_dataset

    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "val" / cls / f"{i}.png")
    ds, info = build_dataset({"dataset": "imagefolder", "root": str(tmp_path)}, "val")
    assert info.class_names == ["cat", "dog"] and info.num_samples == 6 and len(ds) == 6
    with pytest.raises(FileNotFoundError, match="train not found"):
        build_dataset({"dataset": "imagefolder", "root": str(tmp_path)}, "train")  # training still needs train/
