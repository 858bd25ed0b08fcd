"""Moving volume bytes through libvirt streams, hashed in the same pass.

A stream works the same on a local and a remote hypervisor (qemu+ssh://): nothing here
touches the hypervisor's files. Measured here (bench/bench_libvirt.py) a 2 GiB download hashed
in the same pass keeps up with `virsh vol-download`, which does not hash: the receiving
thread only receives (in blocks of libvirt's own stream buffer size), a second thread writes
the file and hashes it (os.write and hashlib both release the GIL).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import IO, Any

from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt.hypervisor import libvirt_module, volume_physical_size
from osimage.errors import BuildError
from osimage.publish.artifacts import ThreadedHasher
from osimage.runner import check_interrupted
from osimage.sizes import human

PROGRESS_EVERY = 10.0  # seconds between progress lines of a long transfer
_ZEROS = bytes(1 << 20)

Progress = Callable[[str], None]


class _Meter:
    """Progress lines for a long transfer, one every PROGRESS_EVERY seconds."""

    def __init__(self, what: str, total: int, progress: Progress | None) -> None:
        self.what, self.total, self.progress = what, total, progress
        self.started = self.last = time.monotonic()
        self.done = 0
        self.calls = 0

    def add(self, n: int) -> None:
        self.done += n
        self.calls += 1
        if self.calls % 256 == 0:  # often enough for Ctrl-C, rare enough to cost nothing
            check_interrupted()
        now = time.monotonic()
        if self.progress is not None and now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = self.done / max(now - self.started, 1e-6)
            of = f" of {human(self.total)}" if self.total else ""
            self.progress(f"{self.what}: {human(self.done)}{of} ({human(rate)}/s)")


@contextlib.contextmanager
def _finished_or_aborted(stream: Any, hasher: ThreadedHasher) -> Iterator[None]:
    """The stream finished when the block completes; aborted, and the hasher's thread ended,
    when it fails (Ctrl-C too)."""
    try:
        yield
        stream.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        with contextlib.suppress(Exception):
            hasher.hexdigest()
        raise


@dataclass(frozen=True)
class Transfer:
    size: int
    sha256: str
    seconds: float

    @property
    def rate(self) -> float:
        return self.size / max(self.seconds, 1e-9)


def upload_stream(conn: Any, vol: Any, source: IO[bytes], size: int,
                  progress: Progress | None = None, what: str = "upload") -> Transfer:
    """Send size bytes of source into vol through a stream, hashing them in the same pass."""
    libvirt = libvirt_module()
    stream = conn.newStream(0)
    vol.upload(stream, 0, size, 0)
    hasher = ThreadedHasher()
    meter = _Meter(what, size, progress)
    t0 = time.monotonic()
    sent = 0
    chunk = int(libvirt.virStorageVol.streamBufSize)
    with _finished_or_aborted(stream, hasher):
        while sent < size:
            block = source.read(min(chunk, size - sent))
            if not block:
                raise BuildError(f"{what}: the source ended after {sent} of {size} bytes")
            hasher.update(block)
            view = memoryview(block)
            while view:
                view = view[stream.send(view.tobytes() if len(view) < len(block) else block):]
            sent += len(block)
            meter.add(len(block))
    return Transfer(size=sent, sha256=hasher.hexdigest(), seconds=time.monotonic() - t0)


class _WriteAndHash:
    """A second thread that writes each received block to the file and then hashes it, so
    the receiving thread only receives. One thread for both costs less CPU than one each
    (measured: 0.3-0.6 s less per 2 GiB), and it still keeps up: writing to the page cache and
    sha256 together run at about 800 MiB/s, faster than the stream. Holes are made with seek,
    so the file stays sparse, and hashed as the zeros they read as."""

    def __init__(self, fd: int, depth: int = 32) -> None:
        self.fd = fd
        self.size = 0
        self.error: BaseException | None = None
        self._h = hashlib.sha256()
        self._q: Queue[bytes | int | None] = Queue(maxsize=depth)
        self._t = threading.Thread(target=self._work, daemon=True, name="volume-writer")
        self._t.start()

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            if self.error is not None:
                continue
            try:
                if isinstance(item, int):
                    os.lseek(self.fd, item, os.SEEK_CUR)
                    while item > 0:
                        step = min(item, len(_ZEROS))
                        self._h.update(_ZEROS if step == len(_ZEROS) else _ZEROS[:step])
                        item -= step
                else:
                    view = memoryview(item)
                    while view:
                        view = view[os.write(self.fd, view):]
                    self._h.update(item)
            except OSError as e:
                self.error = e

    def write(self, block: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.size += len(block)
        self._q.put(block)

    def hole(self, length: int) -> None:
        self.size += length
        self._q.put(length)

    def close(self) -> str:
        """Wait for the writes; the sha256 of everything written."""
        self._q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error
        return self._h.hexdigest()


def download_stream(conn: Any, vol: Any, dest: Path, *, length: int = 0, sparse: bool = False,
                    progress: Progress | None = None, what: str = "download") -> Transfer:
    """Receive vol (or its first length bytes) into dest through a stream.

    sha256 is computed in the same pass, by a second thread that also writes the file, so
    the receiving thread only receives. With sparse, holes in the volume are not
    sent over the connection; they stay holes in dest and are hashed as the zeros they read as.
    dest is written under a temporary name and renamed into place when complete.
    """
    libvirt = libvirt_module()
    flags = libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM if sparse else 0
    total = length or volume_physical_size(vol)
    stream = conn.newStream(0)
    vol.download(stream, 0, length, flags)
    tmp = dest.with_name(f".{dest.name}.download")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = _WriteAndHash(fd)
    meter = _Meter(what, total, progress)
    chunk = int(libvirt.virStorageVol.streamBufSize)
    recv_flags = libvirt.VIR_STREAM_RECV_STOP_AT_HOLE if sparse else 0
    t0 = time.monotonic()
    try:
        while True:
            block = stream.recvFlags(chunk, recv_flags) if sparse else stream.recv(chunk)
            if block == -3:  # a hole at the current position
                n = int(stream.recvHole(0))
                sink.hole(n)
                meter.add(n)
                continue
            if isinstance(block, int):
                raise BuildError(f"{what}: unexpected stream status {block}")
            if not block:
                break
            sink.write(block)
            meter.add(len(block))
        stream.finish()
        digest = sink.close()
        os.ftruncate(fd, sink.size)  # a trailing hole has no bytes written after it
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        with contextlib.suppress(BaseException):
            sink.close()
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, dest)
    return Transfer(size=sink.size, sha256=digest, seconds=time.monotonic() - t0)


def read_volume(conn: Any, vol: Any, limit: int = 1 << 16) -> bytes:
    """The bytes of a small volume (a stamp), read through a stream."""
    stream = conn.newStream(0)
    vol.download(stream, 0, limit, 0)
    parts: list[bytes] = []
    try:
        while block := stream.recv(limit):
            if isinstance(block, int):
                raise BuildError(f"reading volume {vol.name()}: stream status {block}")
            parts.append(block)
        stream.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        raise
    return b"".join(parts)


def hash_volume(conn: Any, vol: Any, length: int, progress: Progress | None = None,
                what: str = "verify") -> Transfer:
    """Size and sha256 of the first length bytes of vol, read back through a stream."""
    stream = conn.newStream(0)
    vol.download(stream, 0, length, 0)
    hasher = ThreadedHasher(depth=32)
    meter = _Meter(what, length, progress)
    t0 = time.monotonic()
    chunk = int(libvirt_module().virStorageVol.streamBufSize)
    with _finished_or_aborted(stream, hasher):
        while block := stream.recv(chunk):
            if isinstance(block, int):
                raise BuildError(f"{what}: unexpected stream status {block}")
            hasher.update(block)
            meter.add(len(block))
    return Transfer(size=hasher.size, sha256=hasher.hexdigest(), seconds=time.monotonic() - t0)


# --- volumes ---------------------------------------------------------------------------------


# --- install sources in the pool ----------------------------------------------------------


@dataclass(frozen=True)
class SourceVolume:
    pool: str
    name: str
    size: int
    sha256: str
    uploaded: bool  # False: it was in the pool already
    seconds: float = 0.0


def source_present(conn: Any, pool: str, name: str, size: int, sha256: str) -> bool:
    """The source volume is there and complete: its stamp (written only after the upload was
    verified) names this sha256, and the volume holds size bytes."""
    vol = lv.find_volume(conn, pool, name)
    stamp = lv.find_volume(conn, pool, lv.stamp_name(name))
    if vol is None or stamp is None:
        return False
    text = read_volume(conn, stamp).decode(errors="replace")
    words = text.split()
    return (len(words) >= 2 and words[0] == sha256 and words[1] == name
            and lv.volume_physical_size(vol) >= size)


def ensure_source_volume(conn: Any, pool: str, name: str, fmt: str, size: int, sha256: str,
                         opener: Callable[[], contextlib.AbstractContextManager[IO[bytes]]],
                         progress: Progress | None = None) -> SourceVolume:
    """Put an install source into the pool unless it is there already.

    The bytes are hashed as they are sent and must match sha256 (the image's checksum); then
    they are read back out of the pool and hashed again, and the volume must hold size bytes.
    Only then is the stamp volume NAME.sha256 written, which is what makes the volume count
    as present: an upload cut short (Ctrl-C, kill -9, a lost connection) is never reused.
    """
    if source_present(conn, pool, name, size, sha256):
        return SourceVolume(pool, name, size, sha256, uploaded=False)
    lv.delete_volume(conn, pool, lv.stamp_name(name))
    lv.delete_volume(conn, pool, name)
    t0 = time.monotonic()
    vol = lv.create_volume(conn, pool, name, size, fmt)
    try:
        with opener() as source:
            sent = upload_stream(conn, vol, source, size, progress, what=f"upload {name}")
        if sent.sha256 != sha256:
            raise BuildError(f"upload of {name}: the source's sha256 is {sent.sha256}, the "
                             f"image's checksum says {sha256}",
                             hint="the source changed, or source.checksum in image.yaml is "
                                  "wrong")
        back = hash_volume(conn, vol, size, progress, what=f"verify {name}")
        physical = lv.volume_physical_size(vol)
        if back.size != size or physical < size:
            raise BuildError(f"upload of {name}: the pool volume holds {min(back.size, physical)}"
                             f" bytes, {size} were sent")
        if back.sha256 != sha256:
            raise BuildError(f"upload of {name}: read back from pool {pool}, its sha256 is "
                             f"{back.sha256}, not {sha256}")
        stamp = f"{sha256}  {name}\n".encode()
        stamp_vol = lv.create_volume(conn, pool, lv.stamp_name(name), len(stamp), "raw")
        upload_stream(conn, stamp_vol, io.BytesIO(stamp), len(stamp), what="stamp")
    except BaseException:
        with contextlib.suppress(Exception):
            lv.delete_volume(conn, pool, lv.stamp_name(name))
        with contextlib.suppress(Exception):
            vol.delete(0)
        raise
    return SourceVolume(pool, name, size, sha256, uploaded=True,
                        seconds=time.monotonic() - t0)
