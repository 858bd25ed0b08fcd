"""The mirror: where artifacts are published, laid out as builds/IMAGE/VERSION/FILE.

The embedded default is a local folder (mirror/ at the root) with the production layout.
Files are copied under a temporary name and renamed into place only when all of them are
complete, so no partial file is ever visible under its final name. A published file never
changes: a publish that would give one other bytes is refused unless replace (--replace), and
one publisher at a time holds the folder's lock (osimage/publish/mirrorlock.py).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from osimage.errors import BuildError
from osimage.fsutil import fsync_dir
from osimage.netreason import os_reason
from osimage.publish.artifacts import Artifact, hash_file
from osimage.publish.mirrorlock import LocalLockFiles, PublishLock, lock_path, refuse_replacing
from osimage.publish.mirrorurl import local_path, url_scheme
from osimage.runner import check_interrupted

LAYOUT = ("builds", "repos/Rocky8")
COPY_CHUNK = 64 << 20


class Mirror(Protocol):
    def describe(self) -> str: ...

    def publish(self, artifacts: Sequence[Artifact], dest: str,
                replace: bool = False) -> list[str]:
        """Publish files under dest (e.g. builds/smoke/1.0); return their mirror paths.

        A file already there with other bytes is refused (PublishRefused) unless replace."""
        ...

    def existing(self, dest: str) -> list[str]:
        """The names of the files published under dest (partial uploads left out)."""
        ...


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class Measured:
    """What the mirror holds at a path: size and sha256, or why it could not tell."""

    size: int | None = None
    sha256: str | None = None
    problem: str | None = None

    def mismatch(self, expected: Any) -> str | None:
        """What differs from a release's FileEntry (a size below 0: not recorded)."""
        if self.problem is not None:
            return self.problem
        if expected.size >= 0 and expected.size != self.size:
            return f"size {self.size} on the mirror, {expected.size} recorded"
        if self.sha256 is not None and self.sha256 != expected.sha256:
            return f"sha256 {self.sha256[:12]}... on the mirror, {expected.sha256[:12]}... recorded"
        return None


@dataclass
class LocalMirror:
    """A mirror in a local folder: published to, and read back by `release verify`."""

    root: Path

    def describe(self) -> str:
        return f"local mirror {self.root}"

    def measure(self, path: str, size: int | None = None) -> Measured:
        target = self.root / path
        try:
            stored = target.stat().st_size
            if size is not None and size >= 0 and stored != size:
                return Measured(size=stored)
            got, digest = hash_file(target)
        except FileNotFoundError:
            return Measured(problem="missing on the mirror")
        except OSError as e:
            return Measured(problem=f"cannot read: {e.strerror}")
        return Measured(size=got, sha256=digest)

    def ensure_layout(self) -> None:
        for sub in LAYOUT:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def existing(self, dest: str) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / dest).iterdir()
                          if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def publish(self, artifacts: Sequence[Artifact], dest: str,
                replace: bool = False) -> list[str]:
        target = self.root / dest
        sources: list[tuple[Path, str | None]] = []
        for a in artifacts:
            sources += [(a.path, a.sha256), (a.checksum_path, None)]
        staged: list[tuple[Path, Path]] = []
        lock: PublishLock | None = None
        try:
            self.ensure_layout()
            target.mkdir(parents=True, exist_ok=True)
            lock = PublishLock(LocalLockFiles(), str(target), lock_path(str(target)))
            lock.acquire()
            todo: list[Path] = []
            changed: list[str] = []
            for src, sha256 in sources:
                final = target / src.name
                if final.exists():
                    if _same_bytes(src, sha256, final):
                        continue
                    changed.append(src.name)
                todo.append(src)
            if changed and not replace:
                raise refuse_replacing(f"{self.describe()}: {dest}", changed)
            for src in todo:
                check_interrupted()
                final = target / src.name
                tmp = temp_name(final)
                staged.append((tmp, final))
                _copy(src, tmp, lock)
                if tmp.stat().st_size != src.stat().st_size:
                    raise BuildError(f"{final}: copy is incomplete")
            check_interrupted()  # nothing is put in place after a stop request
            for tmp, final in staged:
                os.replace(tmp, final)
            fsync_dir(target)
        except OSError as e:
            raise BuildError(f"{self.describe()}: publishing to {dest} failed: {os_reason(e)}",
                             hint="check the free space and permissions of the mirror") from None
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if lock is not None:
                lock.release()
        return [f"{dest}/{src.name}" for src, _ in sources]


def _copy(src: Path, dst: Path, lock: PublishLock) -> None:
    """Copy with sendfile (the bytes never pass through Python) in chunks short enough that a
    stop request is seen within a fraction of a second."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        offset = 0
        while sent := os.sendfile(fout.fileno(), fin.fileno(), offset, COPY_CHUNK):
            offset += sent
            check_interrupted()
            lock.heartbeat()
        os.fsync(fout.fileno())


def _same_bytes(src: Path, sha256: str | None, final: Path) -> bool:
    if sha256 is None:  # a small NAME.sha256 file
        return src.read_bytes() == final.read_bytes()
    return hash_file(final)[1] == sha256 if final.stat().st_size == src.stat().st_size else False


def open_mirror(url: str, root: Path, settings: Mapping[str, Any] | None = None,
                accept_new_host_key: bool = False) -> Mirror:
    """The mirror a site names: a local folder, or ssh://USER@HOST[:PORT]/ROOT.

    settings is the site's whole mirror object (http, identity_file, known_hosts);
    accept_new_host_key is --accept-new-host-key (an SSH mirror's host key not yet known).
    """
    if url_scheme(url) == "ssh":
        from osimage.publish.sshmirror import SSHMirror  # paramiko loads only for an SSH mirror

        return SSHMirror.from_settings(url, settings or {}, root, accept_new_host_key)
    return LocalMirror(local_path(url, root))
