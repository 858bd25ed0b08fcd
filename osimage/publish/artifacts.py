"""Artifacts: size and sha256 from one read of each file, and the NAME.sha256 file beside it."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

from osimage.fsutil import atomic_write_text
from osimage.runner import check_interrupted

CHUNK = 1 << 20  # 1 MiB: large enough that hashlib releases the GIL


@dataclass(frozen=True)
class Artifact:
    path: Path
    size: int
    sha256: str
    kind: str | None = None  # an export's kind in manifest.json (rootfs, ...); None: disk

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checksum_path(self) -> Path:
        return self.path.with_name(self.path.name + ".sha256")


def hash_file(path: Path, chunk: int = CHUNK) -> tuple[int, str]:
    """Size and sha256 of a file, reading it once into a reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    size = 0
    with path.open("rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
            if size % (256 * chunk) == 0:
                check_interrupted()
    return size, h.hexdigest()


class ThreadedHasher:
    """sha256 in a second thread, so hashing overlaps the I/O that produces the bytes."""

    def __init__(self, depth: int = 8) -> None:
        self._h = hashlib.sha256()
        self._q: Queue[bytes | None] = Queue(maxsize=depth)
        self._t = threading.Thread(target=self._work, daemon=True)
        self._t.start()
        self.size = 0

    def _work(self) -> None:
        while (block := self._q.get()) is not None:
            self._h.update(block)

    def update(self, block: bytes) -> None:
        self.size += len(block)
        self._q.put(block)

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()


def write_checksum_file(artifact: Artifact) -> Path:
    """NAME.sha256 in sha256sum format, so `sha256sum -c` works in the mirror folder."""
    out = artifact.checksum_path
    atomic_write_text(out, f"{artifact.sha256}  {artifact.name}\n")
    return out


def record(path: Path) -> Artifact:
    size, digest = hash_file(path)
    artifact = Artifact(path=path, size=size, sha256=digest)
    write_checksum_file(artifact)
    return artifact


def parse_checksum_file(text: str, name: str | None = None) -> str | None:
    """The sha256 from sha256sum-format text (for a given file name when it lists several)."""
    for line in text.splitlines():
        parts = line.strip().split()
        if not parts or len(parts[0]) != 64:
            continue
        if name is None or len(parts) == 1 or parts[-1].lstrip("*") in (name, f"./{name}"):
            return parts[0].lower()
    return None
