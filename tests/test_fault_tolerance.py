"""Kill training with SIGKILL at random points, resume, and get the uninterrupted run's weights bit for bit.

Every run is a child forked from the test process, which has torch imported
already (a fresh interpreter per run would cost seconds each); children use
one thread (the parent's OpenMP pool does not survive a fork, and equal thread
counts give equal floating-point sums). The driver trains an
uninterrupted reference supernet and gate, then runs 20 trials: each forks a
run, kills it -- at a random time, in the middle of its k-th checkpoint write
(the temporary file half written), or right after its k-th checkpoint write
(e.g. between ``last.ckpt`` and ``best.ckpt``) -- checks that ``last.ckpt``
loads, and resumes until the run finishes. The test then compares every
trial's checkpoints and summary with the reference's.
"""

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
import tqdm.auto as tqdm_auto
import tqdm.std as tqdm_std

from dsnet.cli import main
from dsnet.train.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRIALS = 20
CONFIG = [
    "model.name=ds_resnet8_tiny",
    "data.dataset=synthetic",
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=32",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=16",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "data.workers=0",
    "supernet.epochs=3",
    "supernet.warmup_epochs=0.5",
    "supernet.bn_calibration_batches=1",
    "supernet.ema_decay=0.9",
    "gate.epochs=3",
    "log.progress=false",
    "log.tensorboard=false",
]
MODES = ("time", "mid-write", "after-write")


# ------------------------------------------------------------------------------------------ the driver (subprocess)
def _kill_at_write(mode: str, k: int) -> list[int]:
    """Make this process SIGKILL itself in the middle of (or right after) its ``k``-th checkpoint write.

    Returns the running count of checkpoint writes. ``mode="none"`` only counts.
    """
    import dsnet.utils.io as io_mod

    real = io_mod._atomic
    writes = [0]

    def atomic(path, write):
        if not str(path).endswith(".ckpt"):
            return real(path, write)
        writes[0] += 1
        if writes[0] == k and mode == "mid-write":
            import io

            buf = io.BytesIO()
            write(buf)
            fd, _ = io_mod._create_temporary(Path(path))
            os.write(fd, buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(path, write)
        if writes[0] == k and mode == "after-write":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    io_mod._atomic = atomic
    return writes


def _run_child(stage: str, out: Path, resume: bool, supernet: Path | None, mode: str, k: int, count: Path | None):
    """Body of a forked run: train (``mode`` may kill it at its ``k``-th checkpoint write), then ``os._exit``."""
    torch.set_num_threads(1)
    from dsnet.train.config import load_config
    from dsnet.train.gate import train_gate
    from dsnet.train.supernet import train_supernet

    writes = _kill_at_write(mode, k)
    try:
        cfg = load_config(None, CONFIG)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the child ends with os._exit
        if stage == "supernet":
            train_supernet(cfg, out, resume=resume)
        else:
            train_gate(cfg, supernet, out, resume=resume)
        if count is not None:
            count.write_text(str(writes[0]))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _fork(*args, body=None) -> int:
    """Fork a child running ``body(*args)`` (default: :func:`_run_child`); the child always ends with ``os._exit``."""
    pid = os.fork()
    if pid == 0:
        # tqdm's default lock is a multiprocessing semaphore shared across fork: a child SIGKILLed while holding
        # it would leave it held for good, and the parent's tqdm monitor threads and every later child hang on it
        # (seen in CI). The child takes a private lock instead.
        for cls in (tqdm_std.tqdm, tqdm_auto.tqdm):
            cls.set_lock(threading.RLock())
        try:
            (body or _run_child)(*args)
        finally:
            os._exit(1)
    return pid


def _wait(pid: int, timeout: float = 300.0) -> int | None:
    """Exit status (negative: killed by that signal), or None if still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _finish(pid: int) -> int | str:
    """Wait for a run that must end by itself (a hung child is killed and reported as such)."""
    status = _wait(pid)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        return "hung"
    return status


def drive(work: str, seed: int = 0) -> None:
    """Reference runs, then the kill trials; writes ``trials.json`` in ``work``."""
    from dsnet.train.checkpoint import read_checkpoint
    from dsnet.train.config import load_config
    from dsnet.train.supernet import build_optimizer

    work = Path(work)
    build_optimizer([torch.nn.Parameter(torch.zeros(1))], 0.1, load_config(None, CONFIG)["supernet"])  # warm imports
    ref = {"supernet": work / "ref_supernet", "gate": work / "ref_gate"}
    sup = ref["supernet"] / "best.ckpt"
    writes, seconds = {}, {}
    for stage in ("supernet", "gate"):
        t0 = time.monotonic()
        count = work / f"{stage}.writes"
        assert _finish(_fork(stage, ref[stage], False, sup, "none", 0, count)) == 0, f"reference {stage} run failed"
        seconds[stage], writes[stage] = time.monotonic() - t0, int(count.read_text())
    rng = random.Random(seed)
    trials = []
    for t in range(TRIALS):
        stage = "gate" if t % 4 == 3 else "supernet"
        mode = MODES[t % 3]
        k = rng.randint(1, writes[stage])
        delay = rng.uniform(0.0, seconds[stage])
        out = work / f"trial{t:02d}_{stage}"
        pid = _fork(stage, out, False, sup, mode, k, None)
        status = _wait(pid, delay) if mode == "time" else _finish(pid)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            status = _finish(pid)
        trial = {"trial": t, "stage": stage, "mode": mode, "k": k, "delay": round(delay, 3), "status": status}
        last = out / "last.ckpt"
        trial["tmp_files_after_kill"] = len(list(out.glob(".*.tmp"))) if out.is_dir() else 0
        if last.is_file():
            try:
                trial["last_epoch_after_kill"] = read_checkpoint(last)["epoch"]
            except Exception as err:  # recorded; the test fails on it
                trial["last_unreadable"] = f"{type(err).__name__}: {err}"
        trial["resumes"] = []
        while not (out / "summary.json").is_file() and len(trial["resumes"]) < 3:
            resume = last.is_file()
            trial["resumes"].append(
                {"resume": resume, "status": _finish(_fork(stage, out, resume, sup, "none", 0, None))}
            )
        trials.append(trial)
    (work / "trials.json").write_text(json.dumps({"writes": writes, "seconds": seconds, "trials": trials}, indent=1))


# ------------------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    drive(str(work))
    return work, json.loads((work / "trials.json").read_text())


def _same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(fault_runs):
    work, result = fault_runs
    trials = result["trials"]
    assert len(trials) == TRIALS
    killed = [t for t in trials if t["status"] == -signal.SIGKILL]
    # most trials must really have been killed (a time-based kill may land after the run finished)
    assert len(killed) >= TRIALS - 4, trials
    assert {t["mode"] for t in killed} == set(MODES)
    assert any(t["tmp_files_after_kill"] for t in killed), "no kill landed inside a checkpoint write"
    refs = {s: (work / f"ref_{s}") for s in ("supernet", "gate")}
    for t in trials:
        label = json.dumps(t)
        assert "last_unreadable" not in t, label
        assert all(r["status"] == 0 for r in t["resumes"]), label
        out = work / f"trial{t['trial']:02d}_{t['stage']}"
        ref = refs[t["stage"]]
        summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
        ref_summary.pop("rank_param_checksums", None), summary.pop("rank_param_checksums", None)
        for d in (summary, ref_summary):
            d.pop("calibration", None)  # holds timings
        assert summary == ref_summary, label
        for name in ("last.ckpt", "best.ckpt"):
            got, want = read_checkpoint(out / name), read_checkpoint(ref / name)
            _same(got["state_dict"], want["state_dict"], f"{label} {name}")
            if want.get("ema_state_dict"):
                _same(got["ema_state_dict"], want["ema_state_dict"], f"{label} {name} EMA")
            assert got["epoch"] == want["epoch"] and got["best_epoch"] == want["best_epoch"], label
        assert read_checkpoint(out / "best.ckpt")["epoch"] + 1 == summary["best_epoch"], label  # summaries: 1-based
        epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(3)), label
        assert not list(out.glob(".*.tmp")), f"{label}: temporary files left"


def test_failed_resume_with_another_config_writes_nothing(fault_runs, tmp_path, capsys):
    work, _ = fault_runs
    run = tmp_path / "run"
    shutil.copytree(work / "trial00_supernet", run)
    before = (run / "config.yaml").read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  name: ds_resnet20_cifar\n")
    sets = [a for kv in CONFIG if not kv.startswith("model.") for a in ("--set", kv)]
    assert main(["train", "supernet", "--config", str(other), *sets, "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--resume: model.name is 'ds_resnet20_cifar' here but 'ds_resnet8_tiny'" in err, err
    assert len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_bytes() == before
    # the right resume (the run's own config; only a path / logging key changed) still works
    assert main(["train", "supernet", "--resume", "--set", "data.workers=0", "--out", str(run)]) == 0


# ------------------------------------------------------------------------------------------ dsnet compare
def _compare_child(out: Path, mode: str, k: int, count: Path | None) -> None:
    torch.set_num_threads(1)
    from tests.test_compare import _args

    writes = _kill_at_write(mode, k)
    try:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the child ends with os._exit
        code = main(_args(out, "--methods", "static,alone"))
        if count is not None:
            count.write_text(str(writes[0]))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(code)


def _points(out: Path) -> list[tuple]:
    points = json.loads((out / "compare.json").read_text())["points"]
    return [(p["name"], p["top1"], p["mmacs"]) for p in points]


def test_compare_killed_inside_a_checkpoint_write_resumes_to_the_same_result(tmp_path):
    """A forced kill halfway through ``dsnet compare``'s middle checkpoint write, then a re-run: same results."""
    count = tmp_path / "writes"
    assert _finish(_fork(tmp_path / "ref", "none", 0, count, body=_compare_child)) == 0
    k = max(1, int(count.read_text()) // 2)
    out = tmp_path / "killed"
    assert _finish(_fork(out, "mid-write", k, None, body=_compare_child)) == -signal.SIGKILL
    assert list(out.rglob(".*.tmp")), "the kill did not land inside a checkpoint write"
    assert _finish(_fork(out, "none", 0, None, body=_compare_child)) == 0
    assert not list(out.rglob(".*.tmp"))
    assert _points(out) == _points(tmp_path / "ref")
