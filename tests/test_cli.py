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


def test_a_warm_models_listing_imports_neither_torch_nor_the_families(tmp_path, monkeypatch):
    """With every summary cached, ``dsnet models`` reads the cache alone (issue 19: it runs in well under 5 s)."""
    import os
    import subprocess
    import sys

    from dsnet.cli import models

    monkeypatch.setenv("DSNET_CACHE", str(tmp_path))
    size = [3, 32, 32]
    supernet = {"model": "m1", "params_m": 1.0, "subnets": 4, "slimmest_mmacs": 1.0, "widest_routed_mmacs": 2.0,
                "largest_mmacs": 3.0, "input_size": size}  # fmt: skip
    lcnet = {"model": "lc1", "params_m": 1.0, "blocks": 3, "skippable_blocks": 2, "density": 0.5,
             "all_skipped_mmacs": 1.0, "none_skipped_mmacs": 2.0, "dense_mmacs": 3.0, "input_size": size}  # fmt: skip
    entries = {"m1": supernet, "lc1": lcnet, "__models__": {"supernet": ["m1"], "lcnet": ["lc1"]}}
    (tmp_path / "models.json").write_text(json.dumps({models._code_digest(): entries}))
    code = (
        "import sys; from dsnet.cli import main; rc = main(['models', '--json', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'dsnet.models', 'numpy') if m in sys.modules]; "
        "assert rc == 0 and not heavy, (rc, heavy)"
    )
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-c", code, str(out)], env=dict(os.environ), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "m1" in run.stdout and "lc1" in run.stdout and "LC-Net models" in run.stdout
    assert json.loads(out.read_text()) == [supernet, lcnet]
    assert models.cached_listing() == ([supernet], [lcnet])
    # a cache without the names (or another code version's) is not enough: the listing counts as before
    (tmp_path / "models.json").write_text(json.dumps({models._code_digest(): {"m1": supernet}}))
    assert models.cached_listing() is None
