import json

from dsnet.cli import main


def test_models_table_and_json(tmp_path, capsys):
    out = tmp_path / "models.json"
    assert main(["models", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ds_mobilenet_v1" in text and "ds_resnet50" in text
    records = json.loads(out.read_text())
    r50 = next(r for r in records if r["model"] == "ds_resnet50")
    assert abs(r50["largest_mmacs"] - 4089) < 5


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["models", "--subnets", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "Traceback" not in err


def test_demo_runs(capsys):
    assert main(["demo", "--batch-size", "4"]) == 0
    assert "mean MACs per sample" in capsys.readouterr().out
