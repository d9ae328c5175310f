"""Where data comes from on a bare machine: local places, then each mirror (network mocked), then a clear error.

Also the setup script's Debian-package step, run against a fake ``apt-get``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from dsnet.data import build_dataset, loader
from dsnet.data import download as dl

ROOT = Path(__file__).parents[1]
MIRROR_A, MIRROR_B = "https://mirror-a.test/fashion/", "https://mirror-b.test/fashion/"


@pytest.fixture(autouse=True)
def _whole_training_split(monkeypatch):
    """These tests check how datasets are read: ``data.holdout: null`` holds out nothing here (tests/test_holdout.py
    covers the default 10% slice)."""
    import dsnet.data.loader

    monkeypatch.setattr(dsnet.data.loader, "AUTO_HOLDOUT_FRACTION", 0.0)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def fashion_files(n_train: int = 20, n_test: int = 10) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx(rng.integers(0, 10, n, dtype=np.uint8))
    return files


class _Response(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


class Network:
    """A mocked internet: each mirror is up, down, or serves corrupt bytes; every request is recorded."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.state = {MIRROR_A: "up", MIRROR_B: "up"}
        self.requests: list[str] = []

    def urlopen(self, request, timeout=None):
        url = request.full_url if hasattr(request, "full_url") else str(request)
        self.requests.append(url)
        mirror = next(m for m in self.state if url.startswith(m))
        if self.state[mirror] == "down":
            raise urllib.error.URLError(f"{mirror} is unreachable")
        payload = self.files[url[len(mirror) :]]
        return _Response(payload[:-7] if self.state[mirror] == "corrupt" else payload)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Debian folder, user cache and two mirrors, all fake; nothing leaves this test."""
    files = fashion_files()
    net = Network(files)
    md5s = [(name, hashlib.md5(data).hexdigest()) for name, data in files.items()]
    monkeypatch.setitem(dl.RESOURCES, "fashion_mnist", ((MIRROR_A, MIRROR_B), md5s, None))
    monkeypatch.setattr(dl.urllib.request, "urlopen", net.urlopen)
    debian, cache = tmp_path / "debian" / "fashion-mnist", tmp_path / "cache"
    monkeypatch.setattr(loader, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setenv("DSNET_DATA", str(cache))
    return {"net": net, "files": files, "debian": debian, "cache": cache / "fashion_mnist", "tmp": tmp_path}


def _put(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_fallback_order_debian_then_cache_then_each_mirror(world, capsys):
    net, files = world["net"], world["files"]
    # 1. Debian's package folder wins, no network
    _put(world["debian"], files)
    ds, info = build_dataset({"dataset": "fashion_mnist"}, "train")
    assert len(ds) == 20 and info.name == "fashion_mnist" and net.requests == []
    # 2. then the user cache, no network
    for f in world["debian"].iterdir():
        f.unlink()
    _put(world["cache"], files)
    assert len(build_dataset({"dataset": "fashion_mnist"}, "val")[0]) == 10 and net.requests == []
    # 3. then the mirrors in turn: A is down, B serves; after B worked once it is asked first
    for f in world["cache"].iterdir():
        f.unlink()
    net.state[MIRROR_A] = "down"
    ds, _ = build_dataset({"dataset": "fashion_mnist"}, "train")
    names = list(files)
    assert net.requests == [MIRROR_A + names[0], MIRROR_B + names[0], *(MIRROR_B + n for n in names[1:])]
    assert sorted(p.name for p in world["cache"].iterdir()) == sorted(names)  # no temporary files left
    assert all((world["cache"] / n).read_bytes() == data for n, data in files.items())
    assert "downloading it into" in capsys.readouterr().err
    # downloaded once: the next run finds the cache
    net.requests.clear()
    assert len(build_dataset({"dataset": "fashion_mnist"}, "val")[0]) == 10 and net.requests == []


def test_corrupt_mirror_is_skipped_by_md5(world):
    net = world["net"]
    net.state[MIRROR_A] = "corrupt"
    ds, _ = build_dataset({"dataset": "fashion_mnist", "download": True}, "train")
    assert len(ds) == 20 and net.requests[:2] == [MIRROR_A + n for n in list(world["files"])[:1]] + [
        MIRROR_B + list(world["files"])[0]
    ]
    assert all((world["cache"] / n).read_bytes() == data for n, data in world["files"].items())


def test_every_way_failed_lists_what_was_tried(world):
    net = world["net"]
    net.state = {MIRROR_A: "down", MIRROR_B: "down"}
    with pytest.raises(FileNotFoundError) as e:
        build_dataset({"dataset": "fashion_mnist"}, "train")
    msg = str(e.value)
    first = next(iter(world["files"]))
    for tried in (str(world["debian"]), str(world["cache"]), MIRROR_A + first, MIRROR_B + first, "unreachable"):
        assert tried in msg, tried
    assert "apt-get install dataset-fashion-mnist" in msg and "--data DIR" in msg
    assert "data.download=true" not in msg  # that was just tried
    assert "\n" not in msg  # one line for the CLI
    assert not world["cache"].exists() or not any(world["cache"].iterdir())


def test_no_download_when_disabled_or_when_a_root_is_given(world, tmp_path):
    net = world["net"]
    with pytest.raises(FileNotFoundError, match="set data.download=true") as e:
        build_dataset({"dataset": "fashion_mnist", "download": False}, "train")
    assert str(world["debian"]) in str(e.value)
    # auto + an explicit root: the root says where the data is; no download there (a typo must not fetch 30 MB)
    with pytest.raises(FileNotFoundError, match="set data.download=true to fetch it .* into .*elsewhere"):
        build_dataset({"dataset": "fashion_mnist", "root": str(tmp_path / "elsewhere")}, "train")
    assert net.requests == []
    # download: true with a root downloads into it
    ds, _ = build_dataset({"dataset": "fashion_mnist", "root": str(tmp_path / "elsewhere"), "download": True}, "val")
    assert len(ds) == 10 and (tmp_path / "elsewhere" / "t10k-images-idx3-ubyte.gz").is_file()


def test_quickstart_and_default_config_download_automatically():
    from dsnet.quickstart import quickstart_config

    assert quickstart_config()["data"]["download"] == "auto"
    assert dl.RESOURCES["fashion_mnist"][0][1].startswith("https://raw.githubusercontent.com/zalandoresearch/")


# ---------------------------------------------------------------------------------------------------- setup
def _fake_apt(tmp_path: Path, exit_code: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "apt.log"
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit {exit_code}\n')
    apt.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DSNET_NO_APT"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["DSNET_DEBIAN_FASHION_MNIST"] = str(tmp_path / "absent")
    return env


def _install(env: dict[str, str]) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "install_data.sh"
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the script installs only as root")
def test_setup_installs_the_debian_package_and_never_fails(tmp_path):
    env = _fake_apt(tmp_path, exit_code=0)
    run = _install(env)
    assert run.returncode == 0 and "installed from Debian" in run.stdout
    assert (tmp_path / "apt.log").read_text().splitlines() == ["install -y -qq dataset-fashion-mnist"]
    env = _fake_apt(tmp_path, exit_code=100)  # apt fails (no network, locked...): a note, exit 0
    (tmp_path / "apt.log").unlink()
    run = _install(env)
    assert run.returncode == 0 and "will download Fashion-MNIST" in run.stdout
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls == ["install -y -qq dataset-fashion-mnist", "update -qq"]  # update tried once, then gave up
    (tmp_path / "apt.log").unlink()
    for extra in ({"DSNET_DEBIAN_FASHION_MNIST": str(tmp_path)}, {"DSNET_NO_APT": "1"}):  # present / opted out
        assert _install({**env, **extra}).returncode == 0 and not (tmp_path / "apt.log").exists()
    setup, ci = (ROOT / "scripts" / "setup.sh").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "scripts/install_data.sh" in setup and "dataset-fashion-mnist" not in ci  # one place
