"""Atomic file writes: a temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from osimage.errors import BuildError
from osimage.netreason import os_reason


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a file to write; it replaces path only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def waiting_lock(path: Path, waiting: Callable[[], None] = lambda: None,
                 timeout: float | None = None, what: str | None = None) -> Iterator[None]:
    """Hold the file lock at path; if another process has it, call waiting() once and wait
    (at most timeout seconds), still answering Ctrl-C (a blocking acquire would not).
    Every way the lock cannot be had is one BuildError naming it (what, else the path)."""
    from filelock import FileLock, Timeout

    from osimage.runner import check_interrupted

    lock = FileLock(str(path))
    shown = what or str(path)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waiting()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                check_interrupted()
                if deadline is not None and time.monotonic() >= deadline:
                    raise BuildError(f"{shown}: still locked by another command after "
                                     f"{timeout:.0f} s ({path})",
                                     hint="wait for it to finish, then run this again"
                                     ) from None
                with contextlib.suppress(Timeout):
                    lock.acquire(timeout=0.5)
                    break
    except OSError as e:  # not held by anyone: it cannot be made (a folder, no permission)
        raise BuildError(f"cannot take the lock {path}: {os_reason(e)}",
                         hint="check that path and its folder's permissions") from None
    try:
        yield
    finally:
        lock.release()


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as f:
        f.write(text.encode())
