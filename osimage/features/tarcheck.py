"""Is a tarball safe to hand to a VM? One streamed read, nothing extracted on the host; what
the VM gets is a re-pack of exactly the members that were checked.

The raw bytes are hashed as they are read, the (gzip, xz, bzip2 or no) compression is undone
by Python's own readers, and features/tarheaders.py reads the headers strictly: only what GNU
tar, bsdtar, busybox tar and Python's tarfile read the same way (no sparse members, no PAX
keys some tars ignore, no PAX size that differs from the header's, no v7 or star headers, no
data after a lone zero block). A member is then refused for an absolute name, a '..'
component, a name that is not canonical or comes twice, a device or fifo, a setuid/setgid bit,
a hard link to anything but an earlier file, a member beneath a symlink or file (wherever that
comes in the archive), a symlink that leaves the archive when resolved component by component
through the archive's other symlinks (earlier or later ones), or sizes beyond the limits. An
archive is "truncated" when its compressed stream ends early, a member's data is cut short, or
the end-of-archive marker (two zero blocks) is missing after the last member.

With repack_to, the members are also written, as they are read, to a fresh tar (POSIX pax
format, plain ustar where a name fits): owner root, permissions without setuid, setgid or
sticky bits, times clamped to what ustar holds, no '.' entry, nothing else. The VM unpacks that
file, so whatever a tar makes of the original, the VM gets the checked members and only those.

The sha256 of the whole file is always computed to the end, even when the archive is refused,
so a caller checks the sha256 first: a file that is not the one expected is reported as that,
not as whatever damage it has.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from osimage.errors import BuildError
from osimage.features.tarheaders import (
    BLOCK,
    USTAR_MAX_SIZE,
    Header,
    Readable,
    Reader,
    Refused,
    Truncated,
)
from osimage.runner import check_interrupted

CHUNK = 1 << 20
MAX_TRAILING_BYTES = 1 << 20  # zeros after the end-of-archive marker (tar pads to its record)
MAX_LINK_FOLLOWS = 40  # as the kernel's ELOOP
RECORD = 20 * BLOCK
ROOT_MODE = 0o777  # of symlinks in the re-pack


@dataclass(frozen=True)
class Limits:
    """Bounds on what a patch tarball may unpack to (a bomb is refused as it is read)."""

    max_members: int = 100_000
    max_total_bytes: int = 32 << 30  # sum of the members' sizes
    max_member_bytes: int = USTAR_MAX_SIZE  # what a ustar header holds: 8 GiB - 1
    max_name_length: int = 1024  # bytes of a name or a link target
    max_kept_bytes: int = 256 << 20  # metadata files read into memory (repodata, advisories)
    total_because: str = ""  # what max_total_bytes comes from, for the message

    def for_disk(self, disk_bytes: int, because: str) -> Limits:
        """The limits for a VM whose disk holds disk_bytes: the tarball and what it unpacks to
        must both fit, so its members may add up to half the disk at most."""
        if disk_bytes // 2 >= self.max_total_bytes:
            return self
        return replace(self, max_total_bytes=disk_bytes // 2, total_because=f" ({because})")


class UnsafeArchive(BuildError):
    """The tarball is not a complete, safe tar archive; nothing of it was used."""


@dataclass(frozen=True)
class Member:
    name: str  # normalised: no './', no trailing '/'; '' is the root
    kind: str  # file, dir, symlink, hardlink
    mode: int
    size: int
    mtime: int
    linkname: str  # a hard link's normalised target; a symlink's target as stored
    shown: str  # the name as stored, for messages


@dataclass
class Contents:
    """What one pass over a tarball found."""

    sha256: str = ""
    size: int = 0  # bytes of the file as stored
    compression: str = "none"
    members: int = 0
    total_bytes: int = 0  # sum of the members' sizes
    names: set[str] = field(default_factory=set)  # normalised names of files and links
    kinds: dict[str, str] = field(default_factory=dict)  # normalised name: kind, every member
    kept: dict[str, bytes] = field(default_factory=dict)  # bytes of the members asked for
    digests: dict[str, str] = field(default_factory=dict)  # of the members asked for
    problem: str | None = None  # why the archive is refused, or None
    repack_sha256: str = ""  # of the re-pack written to repack_to, when asked for
    repack_size: int = 0


class _Tap:
    """A reader that counts and hashes what passes through it."""

    def __init__(self, inner: Readable, hasher: hashlib._Hash) -> None:
        self.inner = inner
        self.hasher = hasher
        self.pos = 0
        self.mode = "rb"

    def read(self, n: int = -1, /) -> bytes:
        block = self.inner.read(n)
        if block:
            self.hasher.update(block)
            self.pos += len(block)
        return block

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


def _decompressor(raw: _Tap, kind: str) -> Readable:
    fileobj: IO[bytes] = raw  # type: ignore[assignment]  # only read() is used
    if kind == "gzip":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(fileobj, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(fileobj, mode="rb")
    return raw


def normalise(name: str) -> str | None:
    """The name without './' and '//', or None if it is absolute or has '..' (for names that
    metadata inside the archive gives, e.g. repodata's hrefs)."""
    if name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _canonical(name: str, is_dir: bool) -> str | None:
    """A member's name as every tar extracts it: one leading './' and a directory's trailing
    '/' are dropped; None when other '.', '..' or empty components make tars differ."""
    n = "" if name in (".", "./") else name.removeprefix("./")
    if is_dir:
        n = n.removesuffix("/")
    if n == "":
        return ""
    parts = n.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return n


def _too_long(value: str, limits: Limits) -> bool:
    return len(value.encode()) > limits.max_name_length


def _has_control(value: str) -> bool:
    return any(ord(c) < 0x20 or c == "\x7f" for c in value)


def _member(h: Header, seen: dict[str, Member], limits: Limits) -> Member | str:
    """The checked member, or why it is refused."""
    shown = repr(h.name)
    if _too_long(h.name, limits):
        return f"member name longer than {limits.max_name_length} bytes"
    if _has_control(h.name):
        return f"member {shown} has a control character in its name"
    if h.name.startswith("/"):
        return f"member {shown} has an absolute path"
    if normalise(h.name) is None:
        return f"member {shown} has a '..' component"
    if h.kind in ("char device", "block device"):
        return f"member {shown} is a device"
    if h.kind == "fifo":
        return f"member {shown} is a fifo"
    if h.kind != "dir" and h.name.endswith("/"):
        return f"{h.kind} {shown} has a name ending in '/' (some tars make it a directory)"
    name = _canonical(h.name, h.kind == "dir")
    if name is None:
        return f"member {shown} has an empty or '.' component (tars normalise it differently)"
    if name == "" and h.kind != "dir":
        return f"member {shown} is the archive's root but not a directory"
    if name in seen:
        return f"member {shown} comes twice (as {seen[name].shown!r} before)"
    # setgid on a directory only passes its group on (shared folders); setuid never belongs
    if h.mode & (0o4000 if h.kind == "dir" else 0o6000):
        return f"member {shown} is setuid or setgid"
    if h.size > limits.max_member_bytes:
        return f"member {shown} is {h.size} bytes, more than {limits.max_member_bytes}"
    linkname = h.linkname
    if h.kind in ("symlink", "hardlink"):
        if _too_long(linkname, limits):
            return f"link {shown}: its target is longer than {limits.max_name_length} bytes"
        if _has_control(linkname):
            return f"link {shown}: its target has a control character"
    if h.kind == "symlink":
        if not linkname:
            return f"symlink {shown} has an empty target"
        if linkname.startswith("/"):
            return f"symlink {shown} points to the absolute path {linkname!r}"
    if h.kind == "hardlink":
        target = _canonical(linkname, False) if normalise(linkname) is not None else None
        if target is None or linkname.startswith("/"):
            return f"hard link {shown} points outside the archive ({linkname!r})"
        if seen.get(target) is None or seen[target].kind not in ("file", "hardlink"):
            return f"hard link {shown} points to {linkname!r}, not an earlier member"
        linkname = target
    return Member(name=name, kind=h.kind, mode=h.mode & 0o7777, size=h.size, mtime=h.mtime,
                  linkname=linkname, shown=h.name)


def _resolve(nodes: dict[str, Member], where: list[str], target: str,
             budget: list[int]) -> list[str] | None:
    """Where target, followed from the folder `where` as the kernel follows it (component by
    component, through the archive's symlinks), ends up; None when it leaves the root."""
    path = list(where)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not path:
                return None
            path.pop()
            continue
        path.append(part)
        node = nodes.get("/".join(path))
        if node is not None and node.kind == "symlink":
            budget[0] -= 1
            if budget[0] < 0:
                raise RecursionError
            path.pop()
            followed = _resolve(nodes, path, node.linkname, budget)
            if followed is None:
                return None
            path = followed
    return path


def _links_problem(members: list[Member]) -> str | None:
    """The checks that need the whole archive: an extractor makes a member beneath a symlink
    that came earlier through that link, and one that comes later turns earlier paths into
    paths through it."""
    nodes = {m.name: m for m in members}
    for m in members:
        parts = m.name.split("/")
        for i in range(1, len(parts)):
            above = nodes.get("/".join(parts[:i]))
            if above is not None and above.kind != "dir":
                what = "file" if above.kind == "file" else "link"
                return f"member {m.shown!r} lies beneath the {what} {above.name!r}"
    for m in members:
        if m.kind != "symlink":
            continue
        try:
            inside = _resolve(nodes, m.name.split("/")[:-1], m.linkname, [MAX_LINK_FOLLOWS])
        except RecursionError:
            return (f"symlink {m.shown!r} goes through more than {MAX_LINK_FOLLOWS} links "
                    "(a loop)")
        if inside is None:
            return f"symlink {m.shown!r} points outside the archive ({m.linkname!r})"
    return None


class _Repack:
    """The re-pack, written as members are read; hashed as it is written."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def header(self, m: Member, mode: int) -> None:
        info = tarfile.TarInfo(m.name)
        info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                     "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[m.kind]
        info.mode = ROOT_MODE if m.kind == "symlink" else mode & 0o777
        info.size = m.size if m.kind == "file" else 0
        info.mtime = min(max(m.mtime, 0), USTAR_MAX_SIZE)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.linkname = m.linkname
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))

    def close(self) -> None:
        self.write(bytes(2 * BLOCK))
        self.write(bytes(-self.size % RECORD))


def inspect(path: Path, *, keep: Callable[[str], bool] = lambda _: False,
            digest: Callable[[str], bool] = lambda _: False, algorithm: str = "sha256",
            limits: Limits = Limits(), repack_to: Path | None = None) -> Contents:
    """List path's members in one pass. The bytes of the members `keep` names are kept, the
    digest (of `algorithm`) of those `digest` names computed; with repack_to, the checked
    members are written there (removed again when the archive is refused). Never raises for
    a bad archive: the reason is in .problem, and .sha256 covers the whole file either way."""
    try:
        return _inspect(path, keep, digest, algorithm, limits, repack_to)
    except BaseException:  # Ctrl-C: no half-written re-pack is left behind
        if repack_to is not None:
            repack_to.unlink(missing_ok=True)
        raise


def _inspect(path: Path, keep: Callable[[str], bool], digest: Callable[[str], bool],
             algorithm: str, limits: Limits, repack_to: Path | None) -> Contents:
    out = Contents(compression=_sniff(path))
    hasher = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(path.open("rb", buffering=CHUNK))
        raw = _Tap(f, hasher)
        repack = None
        if repack_to is not None:
            repack = _Repack(stack.enter_context(repack_to.open("wb")))
        try:
            if out.compression == "zstd":
                out.problem = "zstd compression is not supported (use gzip or xz)"
            else:
                out.problem = _walk(raw, out, keep, digest, algorithm, limits, repack)
        finally:
            raw.drain()
        if repack is not None and out.problem is None:
            repack.close()
            repack.f.flush()
            os.fsync(repack.f.fileno())
            out.repack_sha256, out.repack_size = repack.hasher.hexdigest(), repack.size
    out.size = raw.pos
    out.sha256 = hasher.hexdigest()
    if out.size == 0:
        out.problem = "empty file"
    if out.problem is not None and repack_to is not None:
        repack_to.unlink(missing_ok=True)
    return out


def _walk(raw: _Tap, out: Contents, keep: Callable[[str], bool], digest: Callable[[str], bool],
          algorithm: str, limits: Limits, repack: _Repack | None) -> str | None:
    data = _decompressor(raw, out.compression)
    reader = Reader(data)
    seen: dict[str, Member] = {}
    kept_bytes = 0
    try:
        while (h := reader.next()) is not None:
            check_interrupted()
            m = _member(h, seen, limits)
            if isinstance(m, str):
                return m
            out.members += 1
            if out.members > limits.max_members:
                return f"more than {limits.max_members} members"
            out.total_bytes += m.size
            if out.total_bytes > limits.max_total_bytes:
                return (f"members add up to more than {limits.max_total_bytes} bytes"
                        f"{limits.total_because}")
            seen[m.name] = m
            out.kinds[m.name] = m.kind
            if m.kind != "dir":
                out.names.add(m.name)
            wanted = m.kind == "file" and keep(m.name)
            if wanted:
                kept_bytes += m.size
                if kept_bytes > limits.max_kept_bytes:
                    return f"metadata members add up to more than {limits.max_kept_bytes} bytes"
            if repack is not None and m.name:
                target = seen.get(m.linkname) if m.kind == "hardlink" else None
                repack.header(m, target.mode if target is not None else m.mode)
            if m.kind == "file":
                problem = _read_member(reader, m, out, wanted,
                                       digest(m.name), algorithm, repack)
                if problem is not None:
                    return problem
        if out.members == 0:
            return "not a tar archive (no members)"
        problem = _links_problem(list(seen.values()))
        if problem is not None:
            return problem
        return _check_end(reader)
    except Refused as e:
        return str(e)
    except Truncated as e:
        return f"truncated: {e}"
    except EOFError:
        return "truncated: the compressed data ends early"
    except (gzip.BadGzipFile, zlib.error, lzma.LZMAError) as e:
        return f"corrupt {out.compression} data ({e})"
    except OSError as e:  # bz2 reports corrupt data as OSError
        return f"corrupt {out.compression} data ({e})"


def _read_member(reader: Reader, m: Member, out: Contents, wanted: bool, hashed: bool,
                 algorithm: str, repack: _Repack | None) -> str | None:
    h = hashlib.new(algorithm)
    parts: list[bytes] = []
    left = m.size
    while left:
        block = reader.read(min(CHUNK, left))
        if not block:
            raise Truncated("a member's data is cut short")
        left -= len(block)
        if hashed:
            h.update(block)
        if wanted:
            parts.append(block)
        if repack is not None:
            repack.write(block)
        check_interrupted()
    if not reader.skip_padding(m.size):
        raise Truncated("a member's data is cut short")
    if repack is not None:
        repack.write(bytes(-m.size % BLOCK))
    if wanted:
        out.kept[m.name] = b"".join(parts)
    if hashed:
        out.digests[m.name] = h.hexdigest()
    return None


def _check_end(reader: Reader) -> str | None:
    """After the end-of-archive marker: zeros only (tar pads to its record size), and the
    compressed stream read to its end, where its checksum is checked."""
    trailing = 0
    while block := reader.read(CHUNK):
        trailing += len(block)
        if block.strip(b"\x00"):
            return "not a valid tar archive (garbled data after the end-of-archive marker)"
        if trailing > MAX_TRAILING_BYTES:
            return f"more than {MAX_TRAILING_BYTES} bytes after the end-of-archive marker"
    return None
