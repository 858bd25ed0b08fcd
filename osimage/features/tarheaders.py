"""A strict reader of tar headers: only what GNU tar, bsdtar, busybox tar and Python's tarfile
all read the same way.

Python's tarfile is lenient where other tars differ: a PAX `size` that busybox ignores, a
signed header checksum, the old GNU fields where POSIX keeps the name prefix, a sparse map, a
lone zero block with members after it. Each of those lets one reader see members another does
not, so a check made with one tar says nothing about what another unpacks. This reader takes
POSIX ustar and GNU headers with octal numbers, a PAX header ('x') of the keys every tar
honours or every tar may ignore, GNU long names ('L', 'K'), and refuses the rest with the
reason (`Refused`). tarcheck.py decides what the members may be; this module only reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

BLOCK = 512
USTAR_MAX_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1
MAX_EXTENSION_BYTES = 64 << 10  # a PAX header's or a GNU long name's data
MAX_HEADER_BYTES = 256 << 20  # all headers and extension data of an archive together

POSIX_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
_OCTAL = re.compile(rb"^ *[0-7]+[ \x00]*$")
_EMPTY = re.compile(rb"^[ \x00]*$")
_PAX_TIME = re.compile(r"^-?[0-9]+(\.[0-9]+)?\Z")
# Every tar reads these and gives them the same meaning (size only when it agrees with the
# header: busybox reads the header's size, not the PAX one).
_PAX_PATHS = ("path", "linkpath")
_PAX_NUMBERS = ("size", "uid", "gid")
_PAX_NAMES = ("uname", "gname")
_PAX_IGNORED = ("mtime", "atime", "ctime", "comment")

KINDS = {b"0": "file", b"\x00": "file", b"1": "hardlink", b"2": "symlink", b"5": "dir",
         b"3": "char device", b"4": "block device", b"6": "fifo"}
_REFUSED_TYPES = {
    b"7": "a contiguous file (a regular file to some tars, refused by others)",
    b"S": "a GNU sparse file (its map is read differently by each tar)",
    b"M": "a GNU multi-volume continuation", b"V": "a GNU volume label",
    b"D": "a GNU dump directory", b"N": "an old GNU long-name record"}


class Refused(Exception):
    """The archive cannot be read the same way by every tar; the message says why."""


class Truncated(Exception):
    """The tar stream ends early (its compression may be whole)."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class Header:
    """One member as every tar reads it."""

    name: str  # as stored, before normalisation
    kind: str  # a value of KINDS
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    offset: int  # of the header that starts the member (its extension headers first)


def _nts(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _octal(field: bytes, what: str, at: int, empty_ok: bool = False) -> int:
    if empty_ok and _EMPTY.match(field):
        return 0
    if field[:1] and field[0] & 0x80:
        raise Refused(f"header at byte {at}: {what} is a base-256 number (not every tar reads "
                      "those)")
    if not _OCTAL.match(field):
        raise Refused(f"garbled header at byte {at}: {what} is not an octal number")
    return int(field.strip(b" \x00"), 8)


def _text(raw: bytes, what: str, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(f"header at byte {at}: {what} is not UTF-8") from None


class Reader:
    """Headers and data of a tar stream, read in order; `offset` counts the bytes read."""

    def __init__(self, src: Readable) -> None:
        self.src = src
        self.offset = 0
        self.header_bytes = 0  # a stream of empty members or extension headers is a bomb too

    def read(self, n: int) -> bytes:
        """n bytes, or fewer only at the end of the stream."""
        parts: list[bytes] = []
        want = n
        while want:
            block = self.src.read(want)
            if not block:
                break
            parts.append(block)
            want -= len(block)
        out = b"".join(parts)
        self.offset += len(out)
        return out

    def skip_padding(self, size: int) -> bool:
        pad = -size % BLOCK
        return len(self.read(pad)) == pad

    def _extension_data(self, size: int, at: int) -> bytes:
        if size > MAX_EXTENSION_BYTES:
            raise Refused(f"header at byte {at}: an extension header of {size} bytes (more "
                          f"than {MAX_EXTENSION_BYTES})")
        data = self.read(size)
        if len(data) != size or not self.skip_padding(size):
            raise Truncated("in an extension header")
        self._count(size)
        return data

    def _count(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise Refused(f"headers add up to more than {MAX_HEADER_BYTES} bytes")

    def next(self) -> Header | None:
        """The next member, or None at the end-of-archive marker (two zero blocks).
        Raises Refused, or Truncated when the stream ends early."""
        start = self.offset
        pax: dict[str, str] | None = None
        long_name: str | None = None
        long_link: str | None = None
        while True:
            at = self.offset
            block = self.read(BLOCK)
            if len(block) < BLOCK:
                raise Truncated("the archive ends without its end-of-archive marker")
            self._count(BLOCK)
            if not block.strip(b"\x00"):
                if pax is not None or long_name is not None or long_link is not None:
                    raise Refused(f"header at byte {at}: an extension header without a member")
                second = self.read(BLOCK)
                if len(second) < BLOCK:
                    raise Truncated("the archive ends without its end-of-archive marker")
                if second.strip(b"\x00"):
                    raise Refused(f"a lone zero block at byte {at} with data after it (some "
                                  "tars stop there, others read on)")
                return None
            fields = _fields(block, at)
            flag = block[156:157]
            if flag in (b"x", b"g", b"L", b"K"):
                data = self._extension_data(fields.size, at)
                if flag == b"g":
                    _global_pax(data, at)
                    if start == at:
                        start = self.offset
                    continue
                if flag == b"x":
                    if pax is not None or long_name is not None or long_link is not None:
                        raise Refused(f"header at byte {at}: a PAX header after another "
                                      "extension header")
                    pax = _pax(data, at)
                    continue
                if pax is not None:
                    raise Refused(f"header at byte {at}: a GNU long name after a PAX header")
                value = _long(data, at)
                if flag == b"L":
                    if long_name is not None:
                        raise Refused(f"header at byte {at}: two GNU long names for one member")
                    long_name = value
                else:
                    if long_link is not None:
                        raise Refused(f"header at byte {at}: two GNU long links for one member")
                    long_link = value
                continue
            if flag in _REFUSED_TYPES:
                raise Refused(f"member {fields.name!r} is {_REFUSED_TYPES[flag]}")
            if flag not in KINDS:
                raise Refused(f"member {fields.name!r} has the unknown type {flag!r}")
            fields.kind = KINDS[flag]
            fields.offset = start
            if long_name is not None:
                fields.name = long_name
            if long_link is not None:
                fields.linkname = long_link
            if pax is not None:
                _apply_pax(fields, pax, at)
            if fields.linkname and fields.kind not in ("symlink", "hardlink"):
                raise Refused(f"{fields.kind} {fields.name!r} has a link target "
                              f"{fields.linkname!r} (busybox makes it a hard link)")
            if fields.kind != "file" and fields.size:
                raise Refused(f"{fields.kind} {fields.name!r} has {fields.size} bytes of data "
                              "(some tars skip them, others read them as headers)")
            return fields


def _fields(block: bytes, at: int) -> Header:
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if not _OCTAL.match(block[148:156]) or int(block[148:156].strip(b" \x00"), 8) != unsigned:
        if at == 0:
            raise Refused("not a tar archive (no valid tar header at its start)")
        raise Refused(f"garbled header at byte {at}: bad checksum")
    flag = block[156:157]
    if flag in _REFUSED_TYPES:  # before the fields they use in their own way
        raise Refused(f"member {_nts(block[:100]).decode(errors='replace')!r} is "
                      f"{_REFUSED_TYPES[flag]}")
    magic = block[257:265]
    if magic == GNU_MAGIC:
        if block[345:BLOCK].strip(b"\x00"):
            raise Refused(f"header at byte {at}: old GNU fields (times, sparse map) where "
                          "POSIX tars read a name prefix")
        prefix = b""
    elif magic == POSIX_MAGIC:
        if block[500:BLOCK].strip(b"\x00"):
            raise Refused(f"header at byte {at}: star's extra fields where other tars read "
                          "a name prefix")
        prefix = _nts(block[345:500])
    else:
        raise Refused(f"header at byte {at}: neither a POSIX ustar nor a GNU tar header "
                      "(old v7 archives are read differently by each tar)")
    name = _nts(block[:100])
    full = prefix + b"/" + name if prefix else name
    return Header(
        name=_text(full, "the name", at), kind="", mode=_octal(block[100:108], "the mode", at),
        uid=_octal(block[108:116], "the uid", at, empty_ok=True),
        gid=_octal(block[116:124], "the gid", at, empty_ok=True),
        size=_octal(block[124:136], "the size", at),
        mtime=_octal(block[136:148], "the mtime", at, empty_ok=True),
        linkname=_text(_nts(block[157:257]), "the link target", at),
        offset=at)


def _records(data: bytes, at: int) -> dict[str, str]:
    """PAX records `LEN KEY=VALUE\\n`, each length exact, each key once."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if not data[pos:].strip(b"\x00"):
            break  # some writers pad the data with NULs
        space = data.find(b" ", pos)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise Refused(f"PAX header at byte {at}: a record without a length")
        end = pos + int(digits)
        record = data[space + 1:end]
        if end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise Refused(f"PAX header at byte {at}: a record whose length is wrong")
        key, _, value = record[:-1].partition(b"=")
        name = _text(key, "a PAX key", at)
        if name in out:
            raise Refused(f"PAX header at byte {at}: the key {name!r} twice (tars keep the "
                          "first or the last)")
        out[name] = _text(value, f"the PAX {name}", at)
        pos = end
    return out


def _pax(data: bytes, at: int) -> dict[str, str]:
    records = _records(data, at)
    for key, value in records.items():
        if key in _PAX_PATHS or key in _PAX_NAMES:
            if "\x00" in value:
                raise Refused(f"PAX header at byte {at}: a NUL in {key}")
        elif key in _PAX_NUMBERS:
            if not value.isdigit():
                raise Refused(f"PAX header at byte {at}: {key} {value!r} is not a number")
        elif key in _PAX_IGNORED:
            if key != "comment" and not _PAX_TIME.match(value):
                raise Refused(f"PAX header at byte {at}: {key} {value!r} is not a time")
        else:
            raise Refused(f"PAX header at byte {at}: the key {key!r} is applied by some tars "
                          "and ignored by others (extended attributes, sparse maps, charsets)")
    return records


def _global_pax(data: bytes, at: int) -> None:
    """A global header is accepted for its comment only (git archive writes its commit id)."""
    other = sorted(set(_records(data, at)) - {"comment"})
    if other:
        raise Refused(f"global PAX header at byte {at}: {', '.join(other)} would apply to every "
                      "later member in some tars only")


def _long(data: bytes, at: int) -> str:
    value = data.rstrip(b"\x00")
    if b"\x00" in value or not value:
        raise Refused(f"GNU long name at byte {at}: a NUL inside the name")
    return _text(value, "a GNU long name", at)


def _apply_pax(h: Header, pax: dict[str, str], at: int) -> None:
    if "path" in pax:
        h.name = pax["path"]
    if "linkpath" in pax:
        h.linkname = pax["linkpath"]
    # busybox reads the header's numbers: a PAX value that differs is read differently
    for key, value in (("size", h.size), ("uid", h.uid), ("gid", h.gid)):
        if key in pax and int(pax[key]) != value:
            raise Refused(f"member {h.name!r}: PAX {key} {pax[key]} but the header says "
                          f"{value} (busybox reads the header)")
