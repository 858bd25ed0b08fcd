"""One publisher at a time per mirror folder, across hosts: a lock file ON the mirror.

The lock is a file beside the folder it guards (builds/IMAGE/.VERSION.publish-lock for
builds/IMAGE/VERSION), created with O_EXCL (a local open, or an SFTP open with the EXCL flag):
of two hosts only one can create it. It holds who took it (host, pid, since) and its mtime is
refreshed while the upload runs. A lock is taken over when it is stale: its process is gone
(same host; or it is this process, whose earlier attempt lost its connection), or it was not
refreshed for STALE_SECONDS (another host that crashed or lost its network). A second
publisher never waits: it fails with one line naming the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time
from typing import Protocol

from osimage.errors import EXIT_USAGE, BuildError, FactoryError

STALE_SECONDS = 600.0
HEARTBEAT_SECONDS = 30.0


class PublishRefused(FactoryError):
    """A publish that would change a file already on the mirror: nothing was changed."""

    exit_code = EXIT_USAGE


class PublishLocked(BuildError):
    """Another publisher holds the folder's lock: nothing was published."""


def refuse_replacing(shown: str, changed: list[str]) -> PublishRefused:
    """The one message for 'a published file would get other bytes'."""
    names = ", ".join(changed)
    return PublishRefused(f"{shown}: already published with other bytes ({names}); a "
                          "published file is never replaced without --replace",
                          hint="publish a new version (a new commit or another --release), or "
                               "pass --replace if the published files are known to be wrong")


class LockFiles(Protocol):
    """The four file operations a lock needs, on a local folder or over SFTP."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create path holding data; False if it exists already."""
        ...

    def read_lock(self, path: str) -> tuple[bytes, float] | None:
        """(content, seconds since its last change), or None if it is gone."""
        ...

    def touch(self, path: str) -> None: ...

    def remove(self, path: str) -> None: ...


def lock_path(folder: str) -> str:
    parent, name = posixpath.split(folder.rstrip("/"))
    return posixpath.join(parent, f".{name}.publish-lock")


class PublishLock:
    """Held while a publish lists, uploads and renames; see the module docstring."""

    def __init__(self, files: LockFiles, folder: str, shown: str) -> None:
        self.files = files
        self.path = lock_path(folder)
        self.shown = shown  # the lock as the user can find it: host:path or a local path
        self.held = False
        self._touched = 0.0

    def acquire(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = json.dumps(owner).encode() + b"\n"
        for _ in range(3):
            if self.files.create_exclusive(self.path, data):
                self.held = True
                self._touched = time.monotonic()
                return
            found = self.files.read_lock(self.path)
            if found is None:
                continue  # released meanwhile
            content, age = found
            holder = _parse_owner(content)
            if not _stale(holder, age):
                who = (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since "
                       f"{holder.get('since', '?')}") if holder else "another publish"
                raise PublishLocked(f"mirror: locked by {who}: {self.shown}; nothing was "
                                 "published", hint="another host publishes the same version "
                                 "now; a lock whose publisher died is taken over after "
                                 f"{STALE_SECONDS / 60:.0f} minutes")
            self.files.remove(self.path)
        raise BuildError(f"mirror: could not take the lock {self.shown}; nothing was published")

    def heartbeat(self) -> None:
        """Refresh the lock's mtime now and then, so a long upload's lock is never stale."""
        now = time.monotonic()
        if self.held and now - self._touched > HEARTBEAT_SECONDS:
            self.files.touch(self.path)
            self._touched = now

    def release(self) -> None:
        if self.held:
            self.held = False
            self.files.remove(self.path)


def _parse_owner(content: bytes) -> dict[str, object]:
    try:
        owner = json.loads(content)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale(owner: dict[str, object], age: float) -> bool:
    if age > STALE_SECONDS:
        return True
    if not owner:
        return False  # being written this very moment, or not ours to judge
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return True  # left by an earlier attempt of this process (its connection dropped)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


class LocalLockFiles:
    """LockFiles on this machine's file system (a local or NFS-mounted mirror)."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    def read_lock(self, path: str) -> tuple[bytes, float] | None:
        try:
            with open(path, "rb") as f:
                return f.read(), time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    def touch(self, path: str) -> None:
        os.utime(path)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
