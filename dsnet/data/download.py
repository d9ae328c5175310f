"""Downloads from the datasets' official hosts and mirrors, md5-checked, with a progress bar.

``data.download`` decides when they happen (see ``dsnet.data.loader``): ``auto``
(the default) downloads into the user cache (``default_data_dir()``) when no
local copy is found, ``true`` also into an explicit ``data.root``, ``false``
never. Each file is tried on every mirror in turn; the mirror that served the
last file is tried first for the next one.

Everything lands atomically: a file is fetched to a temporary name next to its
destination, its md5 is checked, and only then renamed into place; an archive
is extracted into a temporary folder that is renamed into place when complete.
An interrupted or corrupted download therefore never looks like data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "RESOURCES",
    "DownloadError",
    "default_data_dir",
    "md5sum",
    "verify_md5",
    "download_file",
    "download_dataset",
]

log = logging.getLogger(__name__)

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    # the same files (same md5s) in the dataset's own GitHub repository
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

# name -> (mirrors, [(file name, md5)], archive folder to extract or None)
RESOURCES: dict[str, tuple[tuple[str, ...], list[tuple[str, str]], str | None]] = {
    "mnist": (
        _MNIST_MIRRORS,
        [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ],
        None,
    ),
    "fashion_mnist": (
        _FASHION_MIRRORS,
        [
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ],
        None,
    ),
    "cifar10": (
        ("https://www.cs.toronto.edu/~kriz/",),
        [("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
        "cifar-10-batches-py",
    ),
    "cifar100": (
        ("https://www.cs.toronto.edu/~kriz/",),
        [("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")],
        "cifar-100-python",
    ),
}


class DownloadError(RuntimeError):
    """Every mirror failed for a file; ``attempts`` holds ``(url, error message)`` in the order tried."""

    def __init__(self, message: str, attempts: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.attempts = attempts


def default_data_dir() -> Path:
    """Where downloads go when ``data.root`` is not set: ``$DSNET_DATA`` or ``~/.cache/dsnet/data``."""
    env = os.environ.get("DSNET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsnet" / "data"


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)  # the official checksums are md5: integrity, not security
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Raise ``ValueError`` naming the file when its md5 is not ``expected``."""
    got = md5sum(path)
    if got != expected.lower():
        raise ValueError(f"{path}: md5 checksum mismatch (expected {expected}, got {got}); corrupt or truncated file")


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically; with ``md5``, a mismatch raises ``ValueError`` and leaves nothing.

    An existing ``dest`` with the right checksum is kept (no re-download).
    Any URL scheme ``urllib`` knows works, ``file://`` included (how the tests
    exercise this without a network).
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "dsnet"})
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(request, timeout=timeout) as response:
            size = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
            # disable=None: a bar on a terminal, nothing in logs and pipes
            with tqdm(
                total=int(size) if size else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None,
                leave=False,
            ) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
        if md5 is not None and (got := md5sum(tmp)) != md5.lower():
            raise ValueError(
                f"download of {url}: md5 checksum mismatch (expected {md5}, got {got}); corrupt or truncated file"
            )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _extract_tar(archive: Path, root: Path, folder: str) -> Path:
    """Extract ``archive`` (which holds ``folder/``) so that ``root/folder`` appears complete or not at all."""
    final = root / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # "data" refuses absolute paths, links out of tmp, devices
        if not (tmp / folder).is_dir():
            raise ValueError(f"{archive}: expected a top-level folder {folder!r} in the archive")
        if final.exists():
            shutil.rmtree(final)  # a partial folder from an older, non-atomic tool
        os.replace(tmp / folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def download_dataset(name: str, root: str | os.PathLike) -> Path:
    """Download (and extract) dataset ``name`` into ``root``; returns the folder holding its files.

    Raises ``DownloadError`` (with every ``(url, error)`` tried) when some file
    could be fetched from no mirror; files already fetched stay (md5-checked,
    so a later call does not fetch them again).
    """
    if name not in RESOURCES:
        raise ValueError(f"no download for dataset {name!r}; downloadable: {', '.join(RESOURCES)}")
    mirrors, files, folder = RESOURCES[name]
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    order = list(mirrors)
    for filename, md5 in files:
        attempts: list[tuple[str, str]] = []
        for mirror in order:
            url = mirror + filename
            log.warning("downloading %s -> %s", url, root / filename)
            try:
                download_file(url, root / filename, md5)
            except (OSError, ValueError) as e:  # URLError is an OSError; try the next mirror
                attempts.append((url, str(e).removeprefix(f"download of {url}: ")))
                continue
            order.remove(mirror)  # the mirror that worked goes first for the next file
            order.insert(0, mirror)
            break
        else:
            tried = "; ".join(f"{url}: {err}" for url, err in attempts)
            raise DownloadError(f"could not download {filename} for {name}: {tried}", attempts)
        if folder is not None:
            _extract_tar(root / filename, root, folder)
            (root / filename).unlink()  # the extracted folder is what loaders read
    return root / folder if folder is not None else root
