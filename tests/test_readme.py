"""The README's Python training example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def _example(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_training_from_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example saves its weights into the working folder: a temporary one here
    code = _example("### Training from Python")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    model, report = namespace["model"], namespace["report"]
    out = capsys.readouterr().out
    assert out.startswith("gate ") and "cascade" in out
    # the example really trained: the supernet beats chance by far, and the budget was met on the holdout
    assert report["static"][0]["top1"] > 40.0  # chance is 10%
    assert report["summary"]["dynamic_mean_macs"] < report["summary"]["widest_routed"]["macs"]
    assert model.gate.budget_bias.abs().sum() > 0
    saved = sorted(tmp_path.rglob("*.pt"))  # wherever under the working folder the example puts them
    assert len(saved) == 1, saved
    state = torch.load(saved[0], weights_only=True)
    assert state.keys() == model.state_dict().keys()
