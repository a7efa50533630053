"""Atomic file (and folder) writes and an inter-process lock.

A crash (or a kill) never leaves a half-written file under its final name: everything is written to a
temporary file in the same folder and moved into place with `os.replace`, which is atomic on POSIX and
Windows for paths on one file system. `atomic_folder` does the same for a folder of outputs (scripts/test.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Union

import numpy as np

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path`; on normal exit it is renamed to `path`, on error removed.

    `suffix` is kept at the end of the temporary name for writers that pick a format from the
    extension (e.g. PIL).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yields an empty staging folder beside `path` (`.NAME.partial-PID`); on normal exit it becomes `path` (an
    existing `path` is swapped out only then, and removed), on error it is removed and `path` is untouched.

    Staging folders that a killed process (SIGKILL) left for `path` are removed first; a live process's are left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_stale_staging(path: Path) -> None:
    for entry in path.parent.glob(f".{path.name}.partial-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # alive (or not ours): leave it
            pass


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj, compact: bool = False) -> None:
    """Writes `obj` as JSON (indented unless `compact`) to `path` atomically."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    atomic_write_text(path, text + "\n")


def atomic_save_npy(path: PathLike, array: np.ndarray) -> None:
    """Saves `array` as .npy to `path` atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copies the bytes of `src` to `dst` atomically (no re-encoding)."""
    with open(src, "rb") as f:
        atomic_write_bytes(dst, f.read())


@contextlib.contextmanager
def file_lock(lock_path: PathLike, timeout_s: float = 3600.0) -> Iterator[None]:
    """An exclusive lock between processes on one machine (fcntl.flock on `lock_path`).

    Where fcntl is unavailable (Windows) this degrades to no lock; callers also publish their results
    with atomic renames, so a missing lock costs duplicated work, never a corrupt result.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: could not take the lock within {timeout_s:.0f} s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
