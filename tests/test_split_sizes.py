"""Every run's first lines say how many images it trains on, holds out for selection and tests on (one wording)."""

import pytest

from dsnet.data import describe_split_sizes
from dsnet.train.config import load_config

TINY = [
    "model.name=ds_resnet8_tiny",
    "data.dataset=synthetic",
    "data.synthetic.num_train=96",
    "data.synthetic.num_val=40",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=16",
    "data.holdout=32",
    "data.batch_size=32",
    "data.eval_batch_size=40",
    "data.workers=0",
    "supernet.epochs=1",
    "supernet.warmup_epochs=0",
    "supernet.bn_calibration_batches=1",
    "gate.epochs=1",
    "log.progress=false",
    "log.tensorboard=false",
]


class _Stop(Exception):
    """Raised where training would start: the start-of-run lines are what these tests read."""


def _line(out: str, prefix: str) -> str:
    return next(x for x in out.splitlines() if x.startswith(prefix))


def test_the_wording():
    assert describe_split_sizes(55000, 5000, 10000) == "55000 training / 5000 held-out (selection) / 10000 test images"
    assert describe_split_sizes(55000, 5000) == "55000 training / 5000 held-out (selection) images"
    assert describe_split_sizes(60000, 0, 10000) == (
        "60000 training / 10000 test images, none held out (selection reads the test split)"
    )


def test_stage_one_and_two_say_what_is_held_out(tmp_path, capsys):
    from dsnet.train.gate import train_gate
    from dsnet.train.supernet import train_supernet

    train_supernet(load_config(None, TINY), tmp_path / "sup")
    assert _line(capsys.readouterr().out, "[supernet] data: ") == (
        "[supernet] data: 64 training / 32 held-out (selection) images"
    )
    # stage II with the held-out slice turned off: selection reads the test split, and the line says so
    train_gate(load_config(None, [*TINY, "data.holdout=0"]), tmp_path / "sup" / "best.ckpt", tmp_path / "gate")
    assert _line(capsys.readouterr().out, "[gate] data: ") == (
        "[gate] data: 96 training / 40 test images, none held out (selection reads the test split)"
    )


def test_quickstart_and_compare_say_what_is_held_out(monkeypatch, capsys, tmp_path):
    import dsnet.compare.run as compare_run
    import dsnet.train.supernet as supernet
    from dsnet.quickstart import run_quickstart

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(supernet, "train_supernet", stop)
    with pytest.raises(_Stop):
        run_quickstart(tmp_path / "qs", overrides=[*TINY, "data.train_subset=48"])
    assert _line(capsys.readouterr().out, "[quickstart] ") == (
        "[quickstart] ds_resnet8_tiny on synthetic: 48 training / 32 held-out (selection) / 40 test images"
    )
    monkeypatch.setattr(compare_run, "CompareContext", stop)
    lines: list[str] = []
    with pytest.raises(_Stop):  # data.holdout: null holds out 10% of the 96 training images
        compare_run.run_compare(
            tmp_path / "cmp", methods=["static"], overrides=[*TINY, "data.holdout=null"], log=lines.append
        )
    assert lines[0].startswith(
        "[compare] ds_resnet8_tiny on synthetic: 86 training / 10 held-out (selection) / 40 test images, 1 epochs each"
    )
