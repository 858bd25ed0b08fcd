"""What changed inside the images from release A to release B: packages added, removed,
upgraded and downgraded (in the package manager's version order, osimage/release/versions.py),
and the security advisories B's patch tarball applies that A's did not (from the index
published beside each tarball, osimage/features/patchindex.py).

The package lists are the IMAGE.packages.json files the releases record (kind "packages",
osimage/features/packages.py), read from the mirror and checked against their recorded sha256.
A release recorded before package lists existed says so instead of failing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from osimage.features.packages import Package, PackageListError, read_document
from osimage.features.patches import SUFFIX
from osimage.release import commands
from osimage.release.manifest import FileEntry, ImageEntry, Release, ReleaseError
from osimage.release.versions import compare
from osimage.ui import table

MAX_LIST = 64 << 20  # a package list or patch index read from the mirror


def read_mirror_file(reader: commands.MirrorReader, path: str) -> bytes | None:
    """A package list or patch index from the mirror, or None when it is not there."""
    return commands.read_small(reader, path, MAX_LIST)


def list_file(entry: ImageEntry) -> FileEntry | None:
    return next((f for f in entry.files if f.kind == "packages"
                 or (f.kind is None and f.path.endswith(".packages.json"))), None)


@dataclass
class Recorded:
    """One image's package list in one release, or why there is none."""

    manager: str = ""
    packages: list[Package] = field(default_factory=list)
    missing: str | None = None


def recorded(release: Release, image: str,
             reader: Callable[[], commands.MirrorReader]) -> Recorded:
    entry = release.images.get(image)
    if entry is None:
        return Recorded(missing=f"{image} is not in release {release.name}")
    f = list_file(entry)
    if f is None:
        return Recorded(missing=f"no package list recorded for {image} in release "
                                f"{release.name}")
    data = read_mirror_file(reader(), f.path)
    if data is None:
        raise ReleaseError(f"{f.path}: missing on the {reader().describe()} (the package list "
                           f"release {release.name} records for {image})")
    if hashlib.sha256(data).hexdigest() != f.sha256:
        raise ReleaseError(f"{f.path}: its sha256 on the {reader().describe()} is not the one "
                           f"release {release.name} records", hint=f"./build.py release verify "
                                                                    f"{release.name}")
    try:
        manager, packages = read_document(data)
    except PackageListError as e:
        raise ReleaseError(f"{f.path}: {e}") from None
    return Recorded(manager, packages)


@dataclass
class Change:
    name: str
    arch: str
    old: str | None
    new: str | None


@dataclass
class ImageDiff:
    image: str
    note: str | None = None
    added: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    upgraded: list[Change] = field(default_factory=list)
    downgraded: list[Change] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def rows(cs: list[Change]) -> list[dict[str, Any]]:
            return [{"name": c.name, "arch": c.arch, "from": c.old, "to": c.new} for c in cs]

        return {"note": self.note, "added": rows(self.added), "removed": rows(self.removed),
                "upgraded": rows(self.upgraded), "downgraded": rows(self.downgraded)}


def compare_lists(image: str, manager: str, old: Sequence[Package],
                  new: Sequence[Package]) -> ImageDiff:
    """Packages keyed by name and arch; a package installed in several versions (rpm's
    kernels) changes by the versions it gains and loses."""
    def by_key(ps: Sequence[Package]) -> dict[tuple[str, str], list[Package]]:
        out: dict[tuple[str, str], list[Package]] = {}
        for p in ps:
            out.setdefault((p.name, p.arch), []).append(p)
        return out

    o, n = by_key(old), by_key(new)
    d = ImageDiff(image)
    for key in sorted(o.keys() | n.keys()):
        name, arch = key
        was = {p.full_version(manager): p for p in o.get(key, [])}
        now = {p.full_version(manager): p for p in n.get(key, [])}
        if len(was) == 1 and len(now) == 1:
            (vo, po), (vn, pn) = next(iter(was.items())), next(iter(now.items()))
            order = compare(manager, po.evr, pn.evr)
            if order < 0:
                d.upgraded.append(Change(name, arch, vo, vn))
            elif order > 0:
                d.downgraded.append(Change(name, arch, vo, vn))
            continue
        d.removed += [Change(name, arch, v, None) for v in was if v not in now]
        d.added += [Change(name, arch, None, v) for v in now if v not in was]
    return d


class NoIndex(ReleaseError):
    """A patch tarball published without its index (by hand): its advisories are unknown."""


def advisories(release: Release, reader: commands.MirrorReader) -> dict[str, str] | None:
    """{advisory id: type} of the release's patch tarball, from the index beside it; None
    without a tarball."""
    if release.patches is None:
        return None
    path = release.patches.path
    stem = next((path.removesuffix(s) for s in SUFFIX.values() if path.endswith(s)), path)
    data = read_mirror_file(reader, f"{stem}.index.json")
    if data is None:
        raise NoIndex(f"no index beside {path} on the {reader.describe()}")
    try:
        doc = json.loads(data)
        if doc.get("sha256") not in (None, release.patches.sha256):
            raise ReleaseError(f"{stem}.index.json describes another tarball than the one "
                               f"release {release.name} records")
        return {str(a["id"]): str(a.get("type", "")) for a in doc["advisories"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ReleaseError(f"{stem}.index.json on the {reader.describe()}: not a patch "
                           "index (no advisories)") from None


@dataclass
class ReleaseDiff:
    a: str
    b: str
    images: list[ImageDiff]
    advisories: dict[str, str] | None  # applied by B, not by A; None: B has no tarball
    advisories_note: str | None = None  # why they are not known

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b,
                "images": {d.image: d.to_json() for d in self.images},
                "advisories": None if self.advisories is None else
                [{"id": k, "type": v} for k, v in self.advisories.items()],
                "advisories_note": self.advisories_note}


def diff(a: Release, b: Release, open_reader: Callable[[], commands.MirrorReader]) -> ReleaseDiff:
    """The mirror is opened only when a release records something to read there: the file
    diff of two releases recorded before package lists needs no mirror."""
    reader = functools.cache(open_reader)
    images = []
    for image in [i for i in a.images if i in b.images]:  # the file diff names the others
        old, new = recorded(a, image, reader), recorded(b, image, reader)
        note = old.missing or new.missing
        if note is not None:
            images.append(ImageDiff(image, note=note))
        elif old.manager != new.manager:
            images.append(ImageDiff(image, note=f"{image}: package manager {old.manager} in "
                                                f"{a.name}, {new.manager} in {b.name}"))
        else:
            images.append(compare_lists(image, new.manager, old.packages, new.packages))
    if b.patches is None or a.patches == b.patches:
        return ReleaseDiff(a.name, b.name, images, None if b.patches is None else {})
    try:
        applied = advisories(b, reader()) or {}
        before = advisories(a, reader()) or {}
    except NoIndex as e:
        return ReleaseDiff(a.name, b.name, images, None, f"not known ({e})")
    return ReleaseDiff(a.name, b.name, images,
                       {k: v for k, v in applied.items() if k not in before})


def diff_lines(d: ReleaseDiff) -> list[str]:
    out = []
    for i in d.images:
        if i.note is not None:
            out.append(f"  {i.image} packages: {i.note}")
            continue
        out.append(f"  {i.image} packages: {len(i.added)} added, {len(i.removed)} removed, "
                   f"{len(i.upgraded)} upgraded, {len(i.downgraded)} downgraded")
        out += [f"    + {c.name} {c.new} ({c.arch})" for c in i.added]
        out += [f"    - {c.name} {c.old} ({c.arch})" for c in i.removed]
        out += [f"    upgraded {c.name} {c.old} -> {c.new} ({c.arch})" for c in i.upgraded]
        out += [f"    downgraded {c.name} {c.old} -> {c.new} ({c.arch})" for c in i.downgraded]
    if d.advisories is not None or d.advisories_note is not None:
        ids = ", ".join(f"{k} ({v})" if v else k for k, v in (d.advisories or {}).items())
        out.append(f"  advisories {d.b} applies that {d.a} did not: "
                   f"{d.advisories_note or ids or 'none'}")
    return out


def show_packages(release: Release, image: str,
                  reader: Callable[[], commands.MirrorReader]) -> str:
    """`release show X IMAGE --packages`: the image's package list in release X."""
    if image not in release.images:
        raise ReleaseError(f"release {release.name} has no image {image} "
                           f"(images: {', '.join(release.images) or 'none'})")
    got = recorded(release, image, reader)
    if got.missing is not None:
        return got.missing
    rows = [[p.name, p.full_version(got.manager), p.arch, p.source, ", ".join(p.licenses)]
            for p in got.packages]
    return "\n".join([*table(["NAME", "VERSION", "ARCH", "SOURCE", "LICENSES"], rows),
                      f"{len(rows)} packages ({got.manager}) in {image} "
                      f"{release.images[image].version}, release {release.name}"])
