"""What a patch tarball holds: its security advisories and its packages.

A patch tarball carries, at its top level:

    advisories.txt        one line per advisory and package, as `dnf updateinfo list --security`
                          prints them: ADVISORY TYPE/SEVERITY PACKAGE-NEVRA
    repodata/repomd.xml   createrepo_c metadata of the RPMs beside it (rocky8-base's tarballs)
    *.rpm                 the packages

(the smoke image's tarballs hold files/ for busybox instead of RPMs and repodata). When there is
repository metadata it must describe the tarball exactly: repomd.xml's primary file is there
with its sha256, and every package it lists is there with its sha256, so what dnf will install
in the VM is what the host checked. The index published beside a tarball lists its advisories
and its packages.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from osimage.tarcheck import Contents, normalise

ADVISORIES = "advisories.txt"
REPOMD = "repodata/repomd.xml"
MAX_METADATA_BYTES = 512 << 20  # primary.xml once decompressed
_REPO = "{http://linux.duke.edu/metadata/repo}"
_COMMON = "{http://linux.duke.edu/metadata/common}"
_ADVISORY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*[-:][A-Za-z0-9._:-]+$")


class PatchContentError(ValueError):
    """The tarball is a safe archive but not a consistent patch set."""


@dataclass(frozen=True)
class Advisory:
    id: str
    type: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class Package:
    name: str
    epoch: str
    version: str
    release: str
    arch: str
    location: str

    @property
    def nevra(self) -> str:
        epoch = f"{self.epoch}:" if self.epoch not in ("", "0") else ""
        return f"{self.name}-{epoch}{self.version}-{self.release}.{self.arch}"


@dataclass(frozen=True)
class PatchSet:
    advisories: tuple[Advisory, ...]
    packages: tuple[str, ...]  # NEVRAs, from the repository metadata when there is one
    has_repodata: bool


def keep(name: str) -> bool:
    """The members to read into memory during the tarball's one pass."""
    base = posixpath.basename(name)
    return name in (ADVISORIES, REPOMD) or (
        name.startswith("repodata/") and "primary.xml" in base)


def digest(name: str) -> bool:
    """The members whose sha256 is computed during the pass (checked against repodata)."""
    return name.endswith(".rpm")


def read(contents: Contents) -> PatchSet:
    """The advisories and packages of a checked tarball; PatchContentError when they are
    inconsistent."""
    advisories = parse_advisories(contents.kept.get(ADVISORIES))
    rpms = sorted(n for n in contents.names if n.endswith(".rpm"))
    if REPOMD in contents.kept:
        packages = tuple(sorted(p.nevra for p in _repo_packages(contents)))
    elif rpms or any(n.startswith("repodata/") for n in contents.names):
        raise PatchContentError(f"it has {'RPMs' if rpms else 'repodata/'} but no {REPOMD}")
    else:
        packages = tuple(sorted({p for a in advisories for p in a.packages}))
    return PatchSet(advisories=advisories, packages=packages, has_repodata=REPOMD in contents.kept)


def parse_advisories(data: bytes | None) -> tuple[Advisory, ...]:
    if data is None:
        raise PatchContentError(f"it has no {ADVISORIES}")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise PatchContentError(f"{ADVISORIES} is not UTF-8 text") from None
    found: dict[str, tuple[str, list[str]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 3 or not _ADVISORY_ID.match(words[0]):
            raise PatchContentError(f"{ADVISORIES} line {n}: expected 'ADVISORY TYPE PACKAGE', "
                                    f"got {line.strip()[:80]!r}")
        packages = found.setdefault(words[0], (words[1], []))[1]
        if words[2] not in packages:
            packages.append(words[2])
    return tuple(Advisory(id=k, type=v[0], packages=tuple(v[1])) for k, v in found.items())


def _xml(data: bytes, what: str) -> ElementTree.Element:
    # expat (2.4+) refuses entity-expansion bombs and ElementTree resolves no external
    # entities; the bytes' sha256 was checked against repomd.xml before they get here.
    try:
        return ElementTree.fromstring(data)  # noqa: S314
    except ElementTree.ParseError as e:
        raise PatchContentError(f"{what} is not valid XML ({e})") from None


def _decompressed(data: bytes, name: str) -> bytes:
    openers: dict[str, Callable[[io.BytesIO], Any]] = {
        ".gz": lambda f: gzip.GzipFile(fileobj=f), ".xz": lzma.LZMAFile, ".bz2": bz2.BZ2File}
    opener = openers.get(posixpath.splitext(name)[1])
    if name.endswith(".zst"):
        raise PatchContentError(f"{name} is zstd-compressed: make the repository with "
                                "createrepo_c --general-compress-type=gz")
    if opener is None:
        return data
    try:
        with opener(io.BytesIO(data)) as f:
            out: bytes = f.read(MAX_METADATA_BYTES + 1)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise PatchContentError(f"{name} cannot be decompressed ({e})") from None
    if len(out) > MAX_METADATA_BYTES:
        raise PatchContentError(f"{name} is larger than {MAX_METADATA_BYTES} bytes decompressed")
    return out


def _checksum(element: ElementTree.Element | None, prefix: str) -> tuple[str, str]:
    node = element.find(f"{prefix}checksum") if element is not None else None
    if node is None or not node.text:
        return "", ""
    return node.get("type", "sha256"), node.text.strip()


def _repo_packages(contents: Contents) -> list[Package]:
    repomd = _xml(contents.kept[REPOMD], REPOMD)
    primary = next((d for d in repomd.findall(f"{_REPO}data") if d.get("type") == "primary"),
                   None)
    location = primary.find(f"{_REPO}location") if primary is not None else None
    href = normalise(location.get("href", "")) if location is not None else None
    if primary is None or not href:
        raise PatchContentError(f"{REPOMD} names no primary metadata")
    if href not in contents.kept:
        raise PatchContentError(f"{REPOMD} names {href}, which is not in the tarball")
    kind, want = _checksum(primary, _REPO)
    if kind in hashlib.algorithms_available and want:
        got = hashlib.new(kind, contents.kept[href]).hexdigest()
        if got != want:
            raise PatchContentError(f"{href}: {kind} {got[:12]}..., {REPOMD} says {want[:12]}...")
    root = _xml(_decompressed(contents.kept[href], href), href)
    packages = []
    for node in root.findall(f"{_COMMON}package"):
        version = node.find(f"{_COMMON}version")
        loc = node.find(f"{_COMMON}location")
        path = normalise(loc.get("href", "")) if loc is not None else None
        name = (node.findtext(f"{_COMMON}name") or "").strip()
        if version is None or not path or not name:
            raise PatchContentError(f"{href}: a package entry without name, version or location")
        pkg = Package(name=name, epoch=version.get("epoch", "0"), version=version.get("ver", ""),
                      release=version.get("rel", ""),
                      arch=(node.findtext(f"{_COMMON}arch") or "").strip(), location=path)
        if path not in contents.names:
            raise PatchContentError(f"{href} lists {path}, which is not in the tarball")
        kind, want = _checksum(node, _COMMON)
        have = contents.digests.get(path)
        if kind == "sha256" and have is not None and have != want:
            raise PatchContentError(f"{path}: sha256 {have[:12]}..., the repository metadata "
                                    f"says {want[:12]}...")
        packages.append(pkg)
    listed = {p.location for p in packages}
    extra = sorted(n for n in contents.names if n.endswith(".rpm") and n not in listed)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise PatchContentError(f"{extra[0]} is in the tarball but not in its repository "
                                f"metadata{more}")
    return packages


def document(patches: PatchSet, **about: Any) -> dict[str, Any]:
    """The index published beside a tarball (JSON): what it is, its advisories, its packages."""
    return {
        **about,
        "advisories": [{"id": a.id, "type": a.type, "packages": list(a.packages)}
                       for a in patches.advisories],
        "packages": list(patches.packages),
    }
