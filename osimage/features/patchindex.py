"""What a patch tarball holds: its security advisories and its packages.

A patch tarball carries, at its top level:

    advisories.txt        one line per advisory and package, as `dnf updateinfo list --security`
                          prints them: ADVISORY TYPE/SEVERITY PACKAGE-NEVRA
    repodata/repomd.xml   createrepo_c metadata of the RPMs beside it (rocky8-base's tarballs)
    *.rpm                 the packages

(the smoke image's tarballs hold files/ for busybox instead of RPMs and repodata). When there is
repository metadata it must describe the tarball exactly: every file repomd.xml names is there
with its checksum, and every package primary.xml lists is there with its checksum (of any type
createrepo_c writes: md5, sha1 (`sha`), sha224, sha256, sha384, sha512), each a plain file,
not a link, so what dnf will install in the VM is what the host checked. The index published
beside a tarball lists its advisories and its packages.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from osimage.features.tarcheck import Contents, normalise

ADVISORIES = "advisories.txt"
REPOMD = "repodata/repomd.xml"
MAX_METADATA_BYTES = 512 << 20  # primary.xml once decompressed
_REPO = "{http://linux.duke.edu/metadata/repo}"
_COMMON = "{http://linux.duke.edu/metadata/common}"
# createrepo_c --checksum: its names, and hashlib's
CHECKSUM_TYPES = {"md5": "md5", "sha": "sha1", "sha1": "sha1", "sha224": "sha224",
                  "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}
Rehash = Callable[[str], dict[str, str]]  # algorithm -> {member: digest} of the digest() members
_ADVISORY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*[-:][A-Za-z0-9._:-]+\Z")


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
    return name.endswith(".rpm") or name.startswith("repodata/")


class _Digests:
    """The members' digests: sha256 from the pass, another type from one more pass (only for
    a repository made with createrepo_c --checksum other than sha256)."""

    def __init__(self, contents: Contents, rehash: Rehash | None) -> None:
        self.by_type = {"sha256": contents.digests}
        self.rehash = rehash

    def get(self, kind: str, name: str) -> str | None:
        if kind not in self.by_type:
            if self.rehash is None:
                raise PatchContentError(f"cannot compute {kind} checksums of {name}")
            self.by_type[kind] = self.rehash(kind)
        return self.by_type[kind].get(name)


def read(contents: Contents, rehash: Rehash | None = None) -> PatchSet:
    """The advisories and packages of a checked tarball; PatchContentError when they are
    inconsistent. rehash(algorithm) gives digests of another type than sha256."""
    advisories = parse_advisories(contents.kept.get(ADVISORIES))
    rpms = sorted(n for n in contents.names if n.endswith(".rpm"))
    if REPOMD in contents.kept:
        packages = tuple(sorted(p.nevra for p in _repo_packages(contents,
                                                                 _Digests(contents, rehash))))
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


def _checksum(element: ElementTree.Element | None, prefix: str, what: str) -> tuple[str, str]:
    """(hashlib's name of the type, the hex digest) of element's <checksum>."""
    node = element.find(f"{prefix}checksum") if element is not None else None
    if node is None or not node.text:
        raise PatchContentError(f"{what} has no checksum")
    kind = node.get("type", "")
    if kind not in CHECKSUM_TYPES:
        raise PatchContentError(f"{what} has a checksum of the unknown type {kind!r} (types: "
                                f"{', '.join(sorted(CHECKSUM_TYPES))})")
    return CHECKSUM_TYPES[kind], node.text.strip().lower()


def _compare(contents: Contents, digests: _Digests, node: ElementTree.Element, prefix: str,
             path: str, says: str) -> None:
    """The member at path is a plain file whose checksum is the one node gives."""
    kind_of = contents.kinds.get(path)
    if kind_of is None:
        raise PatchContentError(f"{says} names {path}, which is not in the tarball")
    if kind_of != "file":
        raise PatchContentError(f"{path} is a {kind_of}, not a file: refused as {says} names "
                                "it")
    kind, want = _checksum(node, prefix, f"{says}'s entry for {path}")
    have = digests.get(kind, path)
    if have != want:
        raise PatchContentError(f"{path}: {kind} {str(have)[:12]}..., {says} says "
                                f"{want[:12]}...")


def _repo_packages(contents: Contents, digests: _Digests) -> list[Package]:
    repomd = _xml(contents.kept[REPOMD], REPOMD)
    href = ""
    for data in repomd.findall(f"{_REPO}data"):
        location = data.find(f"{_REPO}location")
        path = normalise(location.get("href", "")) if location is not None else None
        if not path:
            raise PatchContentError(f"{REPOMD}: a {data.get('type')} entry without a location")
        _compare(contents, digests, data, _REPO, path, REPOMD)
        if data.get("type") == "primary":
            href = path
    if not href:
        raise PatchContentError(f"{REPOMD} names no primary metadata")
    if href not in contents.kept:
        raise PatchContentError(f"{REPOMD} names {href}, which is not in the tarball")
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
        _compare(contents, digests, node, _COMMON, path, "the repository metadata")
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
