"""Crash-safe file output: atomic whole-file writes and an append-only JSON-lines results log.

A result file is either the old version or the new one, never half of each (temp file + fsync + rename), and a
results log never ends in a half-written record that a reader would trust (each record is one line written and
fsynced at once; a torn last line from a crash is ignored when reading and cut off before the next append).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (mkstemp's own 0o600 is for secrets)."""
    return 0o666 & ~_umask()


def atomic_write_file(path: str | Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary file of this writer's own beside ``path``, then fsync it and rename it over
    ``path``: readers see the old file or the complete new one, and two writers of one path each replace it whole.

    The file gets the mode a plain ``open()`` would give it (the umask applies), not mkstemp's 0o600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_write_file``)."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Atomic, human-readable JSON write."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Fill a folder that appears at ``path`` complete or not at all: yields a temp folder beside it, renamed into
    place when the block ends without an exception (and removed when it raises, Ctrl-C included).

    A non-empty ``path`` is refused before anything is written unless ``overwrite``; then the old folder is moved
    aside and deleted only after the new one is in place.
    """
    target = Path(path)
    check_folder_free(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_folder_free(path: str | Path, *, overwrite: bool = False) -> None:
    """Refuse a ``path`` that is a file, or a non-empty folder unless ``overwrite`` (before any work is done)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; choose a folder path (nothing was written)")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; pass --overwrite (overwrite=True) or choose another folder "
                              "(nothing was written)")


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class ResultsLog:
    """Append-only JSON-lines file of run records, safe to resume after a crash or Ctrl-C."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record; a torn final line (crash mid-write) is skipped."""
        return list(self._iter_records())

    def _iter_records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    return  # torn last line: never trusted
                stripped = line.strip()
                if stripped:
                    yield json.loads(stripped)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a single fsynced line (a torn tail from an earlier crash is cut first)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        line = json.dumps(dict(record), sort_keys=True, default=_json_default) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
