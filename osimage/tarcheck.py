"""Is a tarball safe to hand to a VM? One streamed read, nothing extracted on the host.

The raw bytes are hashed as they are read, the (gzip, xz, bzip2 or no) compression is undone
by Python's own readers, and tarfile lists the members in stream mode. A member is refused for
an absolute name, a '..' component, a link that leaves the archive or goes through another
link, a device or fifo, a setuid/setgid bit, or sizes beyond the limits. An archive is
"truncated" when its compressed stream ends early, a member's data is cut short, or the
end-of-archive marker (two zero blocks) is missing after the last member.

The sha256 of the whole file is always computed to the end, even when the archive is refused,
so a caller checks the sha256 first: a file that is not the one expected is reported as that,
not as whatever damage it has.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import posixpath
import tarfile
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from osimage.errors import BuildError
from osimage.runner import check_interrupted

CHUNK = 1 << 20
BLOCK = 512
END_MARKER = 2 * BLOCK  # a tar archive ends with two zero blocks
TAIL_KEEP = 256 * 1024  # decompressed bytes kept to look at the end-of-archive marker


@dataclass(frozen=True)
class Limits:
    """Bounds on what a patch tarball may unpack to (a bomb is refused before it is opened)."""

    max_members: int = 100_000
    max_total_bytes: int = 32 << 30  # sum of the members' sizes
    max_member_bytes: int = 16 << 30
    max_name_length: int = 1024
    max_kept_bytes: int = 256 << 20  # metadata files read into memory (repodata, advisories)


class UnsafeArchive(BuildError):
    """The tarball is not a complete, safe tar archive; nothing of it was used."""


@dataclass
class Contents:
    """What one pass over a tarball found."""

    sha256: str = ""
    size: int = 0  # bytes of the file as stored
    compression: str = "none"
    members: int = 0
    total_bytes: int = 0  # sum of the members' sizes
    names: set[str] = field(default_factory=set)  # normalised names of files and links
    kept: dict[str, bytes] = field(default_factory=dict)  # bytes of the members asked for
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of the members asked for
    problem: str | None = None  # why the archive is refused, or None


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Tap:
    """A reader that counts (and optionally hashes) what passes through it, and keeps the last
    TAIL_KEEP bytes with their offset."""

    def __init__(self, inner: _Readable, hasher: hashlib._Hash | None = None,
                 keep_tail: bool = False) -> None:
        self.inner = inner
        self.hasher = hasher
        self.pos = 0
        self.mode = "rb"
        self._keep_tail = keep_tail
        self._tail: deque[tuple[int, bytes]] = deque()
        self._tail_bytes = 0

    def read(self, n: int = -1, /) -> bytes:
        block = self.inner.read(n)
        if block:
            if self.hasher is not None:
                self.hasher.update(block)
            if self._keep_tail:
                self._tail.append((self.pos, bytes(block)))
                self._tail_bytes += len(block)
                while self._tail_bytes - len(self._tail[0][1]) >= TAIL_KEEP:
                    self._tail_bytes -= len(self._tail.popleft()[1])
            self.pos += len(block)
        return block

    def since(self, offset: int) -> bytes | None:
        """The bytes read from offset on, or None if they are no longer kept."""
        if not self._tail or self._tail[0][0] > offset:
            return None if offset < self.pos else b""
        out = b"".join(b for _, b in self._tail)
        return out[offset - self._tail[0][0]:]

    def drain(self) -> None:
        while self.read(CHUNK):
            check_interrupted()


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def _decompressor(raw: _Tap, kind: str) -> _Readable:
    fileobj: IO[bytes] = raw  # type: ignore[assignment]  # only read() is used
    if kind == "gzip":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(fileobj, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(fileobj, mode="rb")
    return raw


def normalise(name: str) -> str | None:
    """The member name without './' and '//', or None if it is absolute or has '..'."""
    if name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _member_problem(m: tarfile.TarInfo, name: str, seen: set[str], links: set[str],
                    limits: Limits) -> str | None:
    shown = repr(m.name)
    if len(m.name) > limits.max_name_length:
        return f"member name longer than {limits.max_name_length} characters"
    if any(ord(c) < 0x20 or c == "\x7f" for c in m.name):
        return f"member {shown} has a control character in its name"
    if m.name.startswith("/"):
        return f"member {shown} has an absolute path"
    if normalise(m.name) is None:
        return f"member {shown} has a '..' component"
    parts = name.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            return f"member {shown} lies beneath the link {'/'.join(parts[:i])!r}"
    if m.ischr() or m.isblk():
        return f"member {shown} is a device"
    if m.isfifo():
        return f"member {shown} is a fifo"
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        return f"member {shown} has the unknown type {m.type!r}"
    if m.mode & 0o6000 and not m.isdir():
        return f"member {shown} is setuid or setgid"
    if m.issym():
        if m.linkname.startswith("/"):
            return f"symlink {shown} points to the absolute path {m.linkname!r}"
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
        if target == ".." or target.startswith("../"):
            return f"symlink {shown} points outside the archive ({m.linkname!r})"
    if m.islnk():
        target_name = normalise(m.linkname)
        if target_name is None:
            return f"hard link {shown} points outside the archive ({m.linkname!r})"
        if target_name not in seen:
            return f"hard link {shown} points to {m.linkname!r}, not an earlier member"
    if m.size > limits.max_member_bytes:
        return f"member {shown} is {m.size} bytes, more than {limits.max_member_bytes}"
    return None


def inspect(path: Path, *, keep: Callable[[str], bool] = lambda _: False,
            digest: Callable[[str], bool] = lambda _: False,
            limits: Limits = Limits()) -> Contents:
    """List path's members in one pass. The bytes of the members `keep` names are kept, the
    sha256 of those `digest` names computed. Never raises for a bad archive: the reason is in
    .problem, and .sha256 covers the whole file either way."""
    out = Contents(compression=_sniff(path))
    hasher = hashlib.sha256()
    with path.open("rb", buffering=CHUNK) as f:
        raw = _Tap(f, hasher)
        try:
            if out.compression == "zstd":
                out.problem = "zstd compression is not supported (use gzip or xz)"
            else:
                out.problem = _walk(raw, out, keep, digest, limits)
        finally:
            raw.drain()
    out.size = raw.pos
    out.sha256 = hasher.hexdigest()
    if out.size == 0:
        out.problem = "empty file"
    return out


def _walk(raw: _Tap, out: Contents, keep: Callable[[str], bool],
          digest: Callable[[str], bool], limits: Limits) -> str | None:
    data = _Tap(_decompressor(raw, out.compression), keep_tail=True)
    seen: set[str] = set()
    links: set[str] = set()
    kept_bytes = 0
    try:
        with tarfile.open(fileobj=data, mode="r|") as tar:  # type: ignore[call-overload]
            for m in tar:
                check_interrupted()
                name = normalise(m.name) or ""
                problem = _member_problem(m, name, seen, links, limits)
                if problem is not None:
                    return problem
                out.members += 1
                if out.members > limits.max_members:
                    return f"more than {limits.max_members} members"
                out.total_bytes += m.size
                if out.total_bytes > limits.max_total_bytes:
                    return f"members add up to more than {limits.max_total_bytes} bytes"
                seen.add(name)
                if m.issym() or m.islnk():
                    links.add(name)
                if not m.isdir():
                    out.names.add(name)
                if not m.isreg():
                    continue
                wanted, hashed = keep(name), digest(name)
                if wanted:
                    kept_bytes += m.size
                    if kept_bytes > limits.max_kept_bytes:
                        return f"metadata members add up to more than {limits.max_kept_bytes} bytes"
                if wanted or hashed:
                    problem = _read_member(tar, m, name, out, wanted, hashed)
                    if problem is not None:
                        return problem
            end = tar.offset
    except EOFError:
        return "truncated: the compressed data ends early"
    except (gzip.BadGzipFile, zlib.error, lzma.LZMAError) as e:
        return f"corrupt {out.compression} data ({e})"
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e):
            return "truncated: a member's data is cut short"
        if out.members == 0:
            return f"not a tar archive ({e})"
        return f"not a valid tar archive ({e})"
    except tarfile.TarError as e:
        return f"not a valid tar archive ({e})"
    except OSError as e:  # bz2 reports corrupt data as OSError
        return f"corrupt {out.compression} data ({e})"
    if out.members == 0:
        return "not a tar archive (no members)"
    return _check_end(data, end, out.compression)


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo, name: str, out: Contents,
                 wanted: bool, hashed: bool) -> str | None:
    reader = tar.extractfile(m)
    assert reader is not None
    h = hashlib.sha256()
    parts: list[bytes] = []
    got = 0
    while block := reader.read(CHUNK):
        got += len(block)
        if hashed:
            h.update(block)
        if wanted:
            parts.append(block)
    if got != m.size:
        return f"truncated: member {m.name!r} has {got} of its {m.size} bytes"
    if wanted:
        out.kept[name] = b"".join(parts)
    if hashed:
        out.digests[name] = h.hexdigest()
    return None


def _check_end(data: _Tap, end: int, compression: str) -> str | None:
    """After the last member: the two zero blocks that end an archive, then nothing but padding.
    tarfile stops quietly at a missing or garbled header; this is where that is caught."""
    marker = data.since(end)
    if marker is None:
        return "not a valid tar archive (cannot find the end-of-archive marker)"
    while len(marker) < END_MARKER:
        more = data.read(CHUNK)
        if not more:
            break
        marker += more
    try:
        data.drain()  # reads the compressed stream to its end: its checksum is checked there
    except EOFError:
        return "truncated: the compressed data ends early"
    except (gzip.BadGzipFile, zlib.error, lzma.LZMAError, OSError) as e:
        return f"corrupt {compression} data ({e})"
    if len(marker) < END_MARKER:
        return "truncated: the archive ends without its end-of-archive marker"
    if marker[:END_MARKER].count(0) != END_MARKER:
        return "not a valid tar archive (garbled data where the archive should end)"
    return None
