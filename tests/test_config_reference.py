"""The generated config reference (docs/config.md) and ``dsnet config show|check``."""

from pathlib import Path

import pytest
import yaml

from dsnet.cli import main
from dsnet.cli.config import config_reference
from dsnet.train.config import SCHEMA, load_config
from dsnet.utils.schema import reference_rows

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_committed_reference_is_up_to_date():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_reference(), (
        "docs/config.md is stale: regenerate it with `python -m dsnet config reference > docs/config.md`"
    )
    for name, key in reference_rows(SCHEMA, ""):
        assert f"| `{name}` | {key.type_name()} |" in committed, name


def test_reference_command_prints_the_page(capsys):
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == config_reference()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_passes_config_check(recipe, capsys):
    assert main(["config", "check", str(recipe)]) == 0
    assert capsys.readouterr().out.strip() == f"{recipe}: OK"


def test_show_prints_the_resolved_config(capsys):
    recipe = REPO / "configs" / "fashion_mnist.yaml"
    assert main(["config", "show", str(recipe), "--set", "gate.warmup_epochs=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config(recipe, ["gate.warmup_epochs=0.5"])
    assert shown["gate"]["warmup_epochs"] == 0.5  # fractional warm-up epochs
    assert shown["supernet"]["ema_warmup"] is True  # a default the recipe does not set
