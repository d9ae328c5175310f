"""The steady CPU allocator: glibc's thresholds fixed, recorded in latency tables, set by every command."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from dsnet.utils import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 40 MiB activations (above the 32 MiB that glibc's adaptive mmap threshold can reach): allocated, written and
# freed over and over, as a network's forward pass does; prints the minor page faults of the loop
_LOOP = """
import resource, sys, torch
from dsnet.utils.allocator import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator()
for _ in range(10):  # the heap grows to its steady size first
    torch.empty(10 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(10 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", _LOOP, setting], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_steady_allocator_keeps_large_activations_in_the_process():
    system, steady = _faults("system"), _faults("steady")
    assert system > 20 * 2000  # every 40 MiB block mapped and faulted in afresh (10,240 pages each)
    assert steady < system / 20


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_steady_allocator_is_recorded():
    assert allocator.steady_allocator() is True
    assert allocator.allocator_setting() == "steady"
    assert allocator.steady_allocator() is True  # again: no harm


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True])
def test_steady_allocator_refuses_a_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold must be a positive number of bytes below 2 GiB"):
        allocator.steady_allocator(bad)


def test_environment_variables_count_as_steady(monkeypatch):
    monkeypatch.setitem(allocator._state, "steady", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert allocator.allocator_setting() == "system"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert allocator.allocator_setting() == "system"  # one of the two alone is not steady
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert allocator.allocator_setting() == "steady"


def test_latency_table_names_its_allocator_and_refuses_the_other(monkeypatch):
    import dsnet.utils.latency as latency
    from dsnet.models import create_model

    model = create_model("ds_resnet8_tiny").eval()
    rows = [
        {
            "runtime": "eager",
            "batch_size": 1,
            "repeats": 3,
            "warmup": 0,
            "choices": [{"choice": j, "subnet": k, "ms": 1.0 + j} for j, k in enumerate(model.routing_space)],
        }
    ]
    monkeypatch.setattr(latency, "allocator_setting", lambda: "system")
    table = latency.LatencyTable.build(model, rows)
    assert table.data["machine"]["allocator"] == "system"
    assert table.differences(model) == []
    monkeypatch.setattr(latency, "allocator_setting", lambda: "steady")
    (diff,) = table.differences(model)
    assert diff.startswith("allocator system in the table, steady here")
    with pytest.raises(ValueError, match="allocator system in the table"):
        table.check(model)
    del table.data["machine"]["allocator"]  # a table from before the allocator was recorded: not checked
    assert table.differences(model) == []


def test_every_command_takes_allocator(capsys):
    from dsnet.cli import build_parser
    from dsnet.cli._args import leaf_parsers

    for leaf in leaf_parsers(build_parser()):
        assert "--allocator {steady,system}" in leaf.format_usage(), leaf.prog
    from dsnet.cli import main

    assert main(["models", "--allocator", "system"]) == 0
    assert "ds_resnet8_tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["models", "--allocator", "other"])
    assert "invalid choice: 'other'" in capsys.readouterr().err
