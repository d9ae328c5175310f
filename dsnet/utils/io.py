"""Safe file output: atomic writes, and a check that an output path can be written before the work starts.

A crash or kill mid-write never leaves a truncated file behind: every file is
written to a temporary name beside it (``.NAME.XXXXXXXX.tmp``), flushed to disk
and renamed over the target. The temporary file is created with mode 0666
minus the umask, as ``open()`` would create the file (so 0644 under umask
022), not ``mkstemp``'s 0600: checkpoints and reports are meant to be shared.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_torch_save",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_copy",
    "check_output_file",
    "check_output_dir",
    "remove_stale_temporaries",
]

_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # ours, and older mkstemp-made ones


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, opened for writing, mode 0666 & ~umask (the kernel applies the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # here: the JSON and text writers (and the CLI, which uses them) do not need torch

    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(text.encode(), path)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is never seen half-written."""
    with open(src, "rb") as f:
        data = f.read()
    return atomic_write_bytes(data, dst)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder`` (``.NAME.XXXXXXXX.tmp``).

    Only call this where no other process is writing into ``folder``. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.iterdir():
        if _TMP_NAME.match(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest ancestor that exists (a file or a folder)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _name(what: str, path: Path) -> str:
    return f"{what} {path}".strip()


def _probe_folder(folder: Path, what: str, path: Path) -> None:
    """Create and delete a file in ``folder``: the only check that also catches read-only filesystems as root."""
    try:
        fd, tmp = _create_temporary(folder / "dsnet-write-probe")
    except OSError as err:
        reason = err.strerror or str(err)
        raise PermissionError(f"{_name(what, path)}: cannot write in {folder} ({reason})") from None
    os.close(fd)
    tmp.unlink(missing_ok=True)


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, in one line, if ``path`` cannot be written as a file (folder there, under a file, read-only).

    Called before long work so a run does not die at its last step. Writes
    nothing that stays (a probe file is created and deleted in the nearest
    existing folder). ``what`` names the path in the message, e.g. ``"--json"``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{_name(what, path)}: is a directory; give a file name")
    existing = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not existing.is_dir():
        raise NotADirectoryError(f"{_name(what, path)}: {existing} is a file, not a directory")
    if path.exists() and not os.access(path, os.W_OK) and os.geteuid() != 0:
        raise PermissionError(f"{_name(what, path)}: exists and is not writable")
    _probe_folder(existing, what, path)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail now, in one line, if ``path`` cannot be used as an output folder (a file, under a file, read-only)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{_name(what, path)}: is a file, not a directory")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise NotADirectoryError(f"{_name(what, path)}: {existing} is a file, not a directory")
    _probe_folder(existing, what, path)
    return path
