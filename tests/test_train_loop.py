"""The one training loop (dsnet.train.loop) and what plugs into it: every stage and the Python API.

The loop's own guarantees are tested once, on a toy method (a linear classifier): selection on the held-out
metric, last/best checkpoints, resume equal to the uninterrupted run, callbacks that stop, the non-finite
guards. Each method then has a short test that it runs its epochs through the loop; their resume-equality and
kill tests (tests/test_train_e2e.py, test_lcnet.py, test_fault_tolerance.py) run through it too. The Python
API's fit_supernet / fit_gate get the command line's run folder, resume, holdout selection and callbacks.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dsnet
import dsnet.train.loop as loop_mod
from dsnet.train.api import fit_gate, fit_supernet
from dsnet.train.checkpoint import read_checkpoint
from dsnet.train.distributed import DistContext
from dsnet.train.loop import TrainLoop, TrainResult, stop_after
from dsnet.train.run import RunDir


# ------------------------------------------------------------------------------------------ the loop on a toy method
def _toy(tmp_path, name, resume=False, stop=None, scores=None, lr=0.1):
    """A linear classifier through TrainLoop; ``scores`` (per epoch) stand in for a held-out metric."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # shuffled by torch's RNG: resumed too
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(batch):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    cfg = {"model": {"name": "toy"}, "lr": lr, "log": {"tensorboard": False}}
    run = RunDir(tmp_path / name, cfg, DistContext(), resume, "toy")
    loop = TrainLoop(
        "toy",
        model,
        loader,
        opt,
        step,
        epochs=4,
        lr=lr,
        warmup_steps=2,
        device=torch.device("cpu"),
        run=run,
        selection_key="score",
        evaluate=lambda epoch, record: record.update(score=(scores or [0, 1, 2, 3])[epoch]),
        payload=lambda epoch: {"state_dict": model.state_dict()},
        checkpoint={"model": {"name": "toy", "kwargs": {}}},
        callbacks=[] if stop is None else [stop],
        progress=False,
    )
    loop.start(lambda state: model.load_state_dict(state["state_dict"]))
    result = loop.fit()
    run.close()
    return model, result


def test_loop_selects_on_the_metric_and_writes_last_and_best(tmp_path):
    _, result = _toy(tmp_path, "a", scores=[1.0, 5.0, 3.0, 2.0])
    assert isinstance(result, TrainResult) and len(result) == 4 and result[-1]["epoch"] == 3
    assert (result.best_epoch, result.best_metric) == (2, 5.0)  # 1-based, as the logs count
    last, best = read_checkpoint(result.last_checkpoint), read_checkpoint(result.best_checkpoint)
    assert (last["epoch"], last["best_epoch"], best["epoch"]) == (3, 1, 1)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["best_metric"] for r in records] == [1.0, 5.0, 5.0, 5.0]


def test_loop_resume_equals_uninterrupted_and_a_callback_stops(tmp_path):
    full, _ = _toy(tmp_path, "full")
    seen = []
    _, cut = _toy(tmp_path, "cut", stop=lambda end: seen.append(end.epoch) or end.epoch == 2)
    assert cut.stopped_after_epoch == 1 and seen == [1, 2] and read_checkpoint(tmp_path / "cut" / "last.ckpt")["epoch"]
    resumed, rest = _toy(tmp_path, "cut", resume=True)
    assert [r["epoch"] for r in rest] == [2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert stop_after(1)(type("E", (), {"epoch": 2})()) and not stop_after(1)(type("E", (), {"epoch": 1})())


def test_loop_saves_nothing_of_a_diverged_epoch(tmp_path):
    with pytest.raises(FloatingPointError, match="toy training diverged at epoch 1"):
        _toy(tmp_path, "nan", lr=float("nan"))
    assert not (tmp_path / "nan" / "last.ckpt").exists()


# ------------------------------------------------------------------------------------------ every method plugs in
@pytest.fixture
def loop_calls(monkeypatch):
    """The stages each TrainLoop.fit ran for."""
    calls = []
    real = loop_mod.TrainLoop.fit

    def spy(self):
        calls.append(self.stage)
        return real(self)

    monkeypatch.setattr(loop_mod.TrainLoop, "fit", spy)
    return calls


TINY = ["data.dataset=synthetic", "data.synthetic.num_train=64", "data.synthetic.num_val=32",
        "data.synthetic.channels=1", "data.synthetic.image_size=16", "data.batch_size=32", "data.eval_batch_size=32",
        "data.workers=0", "supernet.epochs=1", "supernet.bn_calibration_batches=1", "gate.epochs=1", "lcnet.epochs=1",
        "log.progress=false", "log.tensorboard=false"]  # fmt: skip


def test_every_stage_runs_the_shared_loop(tmp_path, loop_calls):
    from dsnet.train.config import load_config
    from dsnet.train.gate import train_gate
    from dsnet.train.lcnet import train_lcnet
    from dsnet.train.supernet import train_supernet

    cfg = load_config(None, TINY + ["model.name=ds_resnet8_tiny"])
    assert train_supernet(cfg, tmp_path / "sup")["best_epoch"] == 1
    assert train_gate(cfg, tmp_path / "sup" / "best.ckpt", tmp_path / "gate")["best_epoch"] == 1
    train_lcnet(load_config(None, TINY + ["model.name=lc_resnet8_tiny"]), tmp_path / "lc")
    assert (tmp_path / "lc" / "config.yaml").is_file()  # LC-Net opens its run folder as the other stages do
    assert loop_calls == ["supernet", "gate", "lcnet"]


# ------------------------------------------------------------------------------------------ the Python API
def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (160,), generator=g)
    images = torch.randn(160, 1, 16, 16, generator=g) * 0.3 + labels[:, None, None, None] / 3.0
    train = DataLoader(TensorDataset(images[:128], labels[:128]), batch_size=32, shuffle=True)
    holdout = DataLoader(TensorDataset(images[128:], labels[128:]), batch_size=32)
    return train, holdout


def _model():
    torch.manual_seed(0)
    return dsnet.create_model("ds_resnet8_tiny", num_classes=4, in_chans=1)


def test_fit_supernet_run_folder_holdout_and_resume(tmp_path, loop_calls):
    train, holdout = _data()
    kw = dict(epochs=3, lr=0.05, holdout=holdout, progress=False, model_spec={"name": "ds_resnet8_tiny",
              "kwargs": {"num_classes": 4, "in_chans": 1}})  # fmt: skip
    whole = _model()
    result = fit_supernet(whole, train, out=tmp_path / "whole", **kw)
    assert loop_calls == ["supernet"] and len(result) == 3 and result.selection_split == "holdout"
    assert result[0]["ema_top1_widest"] >= 0 and result.best_epoch in (1, 2, 3)
    best = read_checkpoint(result.best_checkpoint)
    assert best["epoch"] + 1 == result.best_epoch and best["best_metric"] == result.best_metric
    for k, v in whole.state_dict().items():  # the model ends with the best epoch's EMA weights
        assert torch.equal(v, best["ema_state_dict"][k]), k
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["best_epoch"] == result.best_epoch
    assert dsnet.load(result.last_checkpoint).stage == "supernet"  # model_spec makes it loadable
    # killed after epoch 1 (a callback stops it there), resumed: the uninterrupted run's weights bit for bit
    cut = _model()
    stopped = fit_supernet(cut, train, out=tmp_path / "cut", on_epoch_end=lambda end: end.epoch == 1, **kw)
    assert stopped.stopped_after_epoch == 0 and len(stopped) == 1
    with pytest.raises(ValueError, match="already holds a run.*pass resume=True or choose another out="):
        fit_supernet(_model(), train, out=tmp_path / "cut", **kw)
    with pytest.raises(ValueError, match="resume=True: fit_supernet.lr is 0.1 here but 0.05"):
        fit_supernet(_model(), train, out=tmp_path / "cut", resume=True, **{**kw, "lr": 0.1})
    cut = _model()
    rest = fit_supernet(cut, train, out=tmp_path / "cut", resume=True, **kw)
    assert [r["epoch"] for r in rest] == [1, 2] and rest.best_epoch == result.best_epoch
    for a, b in zip(whole.state_dict().values(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pass out="):
        fit_supernet(_model(), train, epochs=1, resume=True)


def test_fit_gate_holdout_budget_and_resume(tmp_path):
    train, holdout = _data()
    model = _model()
    fit_supernet(model, train, epochs=1, lr=0.05, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(epochs=2, target_fraction=0.6, holdout=holdout, progress=False)
    torch.manual_seed(1)  # the Gumbel noise and the shuffling: the same draws for both runs
    whole = fit_gate(model, train, out=tmp_path / "g", **kw)
    record = whole[-1]
    assert record["selection_split"] == "holdout" and 0 <= record["holdout_top1"] <= 100
    assert "budget_bias" in record and record["target_mmacs"] > 0
    best = read_checkpoint(whole.best_checkpoint)
    for k, v in model.state_dict().items():  # the best epoch's head and budget bias
        assert torch.equal(v, best["state_dict"][k]), k
    again = _model()
    again.load_state_dict(state)
    torch.manual_seed(1)
    fit_gate(again, train, out=tmp_path / "cut", callbacks=[stop_after(0)], **kw)
    again.load_state_dict(state)
    fit_gate(again, train, out=tmp_path / "cut", resume=True, **kw)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fit_without_holdout_or_out_is_the_old_api():
    train, _ = _data()
    model = _model()
    history = fit_supernet(model, train, epochs=1, lr=0.05, progress=False)
    assert history and history.best_epoch == 1 and history.best_checkpoint is None and history.best_metric is None
    assert set(history[0]) >= {"loss_largest", "loss_smallest", "epoch", "lr"} and "best_metric" not in history[0]
    head = [p.detach().clone() for p in model.routing_head().parameters()]
    history = fit_gate(model, train, epochs=1, progress=False, amp=True, device="cpu")
    after = list(model.routing_head().parameters())
    assert not all(torch.equal(a, b) for a, b in zip(head, after, strict=True)) and "holdout_top1" not in history[0]
    assert all(torch.isfinite(torch.tensor(float(v))) for v in history[0].values())
