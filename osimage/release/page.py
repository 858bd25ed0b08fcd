"""The release pages on the mirror: releases/index.html and releases/X/index.html.

Static HTML from templates/release/*.html.j2 (Jinja2, autoescaped: a description, advisory or
package name can never add markup), no JavaScript, one small stylesheet inline, readable on a
phone. Links are relative, so the pages work under any HTTP base that serves the mirror root.

What a release page shows: whether the release is signed (and how to check it), each image
with its files (size, sha256, link), the patch tarball with the advisories of its index
(NAME.index.json beside it, osimage/features/patchindex.py), and the package changes since the
previous release when package lists exist. Package lists are the hook for IMAGE.packages.json
(written by the package-list feature): the image's recorded file of kind `packages` or named
*.packages.json, else builds/IMAGE/VERSION/IMAGE.packages.json on the mirror; a list of NEVRA
strings, of {name, epoch, version, release, arch}, or {"packages": either}. Without one on
both sides the section says so and nothing is compared.

The pages are not part of what a signature covers, so unlike everything else on the mirror
they are replaced each time they are written.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from osimage import config
from osimage.errors import BuildError, ConfigError
from osimage.features.patches import SUFFIX
from osimage.publish.artifacts import Artifact
from osimage.publish.artifacts import record as record_artifact
from osimage.publish.mirror import open_mirror
from osimage.release import commands as release
from osimage.release.commands import MirrorReader
from osimage.release.manifest import MANIFEST, UNKNOWN_SIZE, ImageEntry, Release
from osimage.release.patches import read_side_file
from osimage.release.sign import SIGNATURE, SUMS, Signed, release_dir, signed_of
from osimage.runner import child_env
from osimage.sizes import human

TEMPLATES = "templates/release"
PACKAGES_SUFFIX = ".packages.json"
_ADDED_RELEASE = re.compile(r"^\+  ['\"]?([0-9A-Za-z][0-9A-Za-z._+-]*)['\"]?:\s*(#.*)?$")
_NEVRA = re.compile(r"^(?P<name>.+)-(?P<evr>[^-]+-[^-]+)\Z")


@dataclass(frozen=True)
class FileView:
    name: str
    path: str
    href: str
    size: str
    sha256: str
    kind: str


@dataclass(frozen=True)
class PackageChanges:
    previous: str | None  # the release compared with; None: no previous release
    available: bool  # both sides have a package list
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class ImageView:
    name: str
    version: str
    git_commit: str
    files: list[FileView]
    packages: PackageChanges


@dataclass(frozen=True)
class AdvisoryView:
    id: str
    type: str
    packages: list[str]


@dataclass(frozen=True)
class PatchView:
    file: FileView
    advisories: list[AdvisoryView] | None  # None: no index beside the tarball


@dataclass(frozen=True)
class ReleaseView:
    name: str
    description: str
    date: str  # "": not committed yet
    signed: Signed | None
    images: list[ImageView]
    patches: PatchView | None
    href: str


def _file_view(path: str, size: int, sha256: str, kind: str | None) -> FileView:
    shown = "?" if size == UNKNOWN_SIZE else f"{human(size)} ({size:,} bytes)"
    return FileView(name=PurePosixPath(path).name, path=path, href="../../" + quote(path),
                    size=shown, sha256=sha256, kind=kind or "")


def release_dates(root: Path) -> dict[str, str]:
    """The day each release first appeared in a commit of manifest.yaml (one git call)."""
    proc = subprocess.run(["git", "-C", str(root), "log", "--reverse", "--format=@@@%cs", "-p",
                           "-U0", "--", MANIFEST], capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, env=child_env())
    dates: dict[str, str] = {}
    day = ""
    for line in proc.stdout.splitlines():
        if line.startswith("@@@"):
            day = line[3:]
        elif (m := _ADDED_RELEASE.match(line)) is not None:
            dates.setdefault(m[1], day)
    return dates


# --- package lists (the hook for IMAGE.packages.json) ------------------------------------------


def _package_path(image: str, entry: ImageEntry) -> str:
    for f in entry.files:
        if f.kind == "packages" or f.path.endswith(PACKAGES_SUFFIX):
            return f.path
    folder = PurePosixPath(entry.files[0].path).parent
    return f"{folder}/{image}{PACKAGES_SUFFIX}"


def parse_packages(data: bytes) -> dict[str, str]:
    """name -> version-release.arch (with epoch) from a package list; ValueError if it is
    none of the shapes the module docstring names."""
    doc: Any = json.loads(data)
    if isinstance(doc, dict) and "packages" in doc:
        doc = doc["packages"]
    if isinstance(doc, dict):
        return {str(k): str(v) for k, v in doc.items()}
    if not isinstance(doc, list):
        raise ValueError("not a list of packages")
    out: dict[str, str] = {}
    for item in doc:
        if isinstance(item, str):
            m = _NEVRA.match(item)
            if m is None:
                raise ValueError(f"{item!r} is not NAME-VERSION-RELEASE.ARCH")
            out[m["name"]] = m["evr"]
        elif isinstance(item, dict) and "name" in item:
            epoch = str(item.get("epoch") or "")
            evr = "-".join(str(item[k]) for k in ("version", "release") if item.get(k))
            arch = f".{item['arch']}" if item.get("arch") else ""
            out[str(item["name"])] = (f"{epoch}:" if epoch not in ("", "0") else "") + evr + arch
        else:
            raise ValueError("a package is neither a NEVRA string nor an object with a name")
    return out


def _packages(reader: MirrorReader, image: str, entry: ImageEntry) -> dict[str, str] | None:
    data = read_side_file(reader, _package_path(image, entry))
    if data is None:
        return None
    try:
        return parse_packages(data)
    except (ValueError, TypeError):
        return {}


def package_changes(reader: MirrorReader, image: str, entry: ImageEntry,
                    previous: Release | None) -> PackageChanges:
    prev_name = previous.name if previous is not None else None
    new = _packages(reader, image, entry)
    if new is None:
        return PackageChanges(prev_name, False, note="no package list")
    old_entry = previous.images.get(image) if previous is not None else None
    if old_entry is None:
        what = "no previous release" if previous is None else f"not in release {prev_name}"
        return PackageChanges(prev_name, False, note=f"{len(new)} packages; {what}")
    old = _packages(reader, image, old_entry)
    if old is None:
        return PackageChanges(prev_name, False,
                              note=f"{len(new)} packages; release {prev_name} has no list")
    return PackageChanges(
        prev_name, True,
        added=sorted((n, new[n]) for n in new.keys() - old.keys()),
        removed=sorted((n, old[n]) for n in old.keys() - new.keys()),
        changed=sorted((n, old[n], new[n]) for n in new.keys() & old.keys() if old[n] != new[n]),
        note=f"{len(new)} packages")


# --- the views ---------------------------------------------------------------------------------


def _patch_view(reader: MirrorReader, rel: Release) -> PatchView | None:
    p = rel.patches
    if p is None:
        return None
    view = _file_view(p.path, UNKNOWN_SIZE if p.size is None else p.size, p.sha256, "patches")
    stem = next((p.path.removesuffix(s) for s in SUFFIX.values() if p.path.endswith(s)), p.path)
    data = read_side_file(reader, f"{stem}.index.json")
    if data is None:
        return PatchView(view, None)
    try:
        doc = json.loads(data)
        advisories = [AdvisoryView(str(a["id"]), str(a["type"]),
                                   [str(x) for x in a.get("packages", [])])
                      for a in doc.get("advisories", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        advisories = []
    return PatchView(view, advisories)


def views(root: Path, reader: MirrorReader) -> list[ReleaseView]:
    """Every release, newest first (manifest.yaml lists them oldest first)."""
    m = release.load(root)
    dates = release_dates(root)
    out: list[ReleaseView] = []
    previous: Release | None = None
    for name in m.names:
        rel = m.get(name)
        signed = signed_of(root, name, m.doc)
        images = [ImageView(image, e.version, e.git_commit,
                            [_file_view(f.path, f.size, f.sha256, f.kind) for f in e.files],
                            package_changes(reader, image, e, previous))
                  for image, e in rel.images.items()]
        date = signed.date[:10] if signed is not None else dates.get(name, "")
        out.append(ReleaseView(name=name, description=rel.description or "", date=date,
                               signed=signed, images=images, patches=_patch_view(reader, rel),
                               href=f"{quote(name)}/index.html"))
        previous = rel
    return out[::-1]


def render(root: Path, releases: Iterable[ReleaseView], out: Path) -> list[Path]:
    """Write index.html and X/index.html under out; return them."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root / TEMPLATES)),
                             undefined=jinja2.StrictUndefined, autoescape=True,
                             keep_trailing_newline=True)
    items = list(releases)
    common: Mapping[str, Any] = {"sums": SUMS, "signature": SIGNATURE}
    try:
        written = [out / "index.html"]
        written[0].write_text(env.get_template("index.html.j2").render(releases=items, **common))
        for view in items:
            folder = out / view.name
            folder.mkdir(parents=True, exist_ok=True)
            page = folder / "index.html"
            page.write_text(env.get_template("release.html.j2").render(release=view, **common))
            written.append(page)
    except jinja2.TemplateNotFound as e:
        raise ConfigError(f"{TEMPLATES}/{e.name}: missing") from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"{TEMPLATES}: {e}") from None
    return written


def publish_index(root: Path, site_file: Path | None, mirror_url: str | None,
                  accept_new_host_key: bool) -> list[str]:
    """Render every release page and publish it to the site's mirror (replacing the old)."""
    site = config.load_site(root, site_file)
    reader = release.open_reader(root, site_file, mirror_url)
    items = views(root, reader)
    mirror = open_mirror(site.mirror_url, root, site.data["mirror"], accept_new_host_key)
    lines = []
    with tempfile.TemporaryDirectory(prefix="osimage-pages-") as tmp:
        pages = render(root, items, Path(tmp))
        by_dest: dict[str, list[Artifact]] = {}
        for page in pages:
            rel = page.parent.relative_to(tmp).as_posix()
            dest = "releases" if rel == "." else release_dir(rel)
            by_dest.setdefault(dest, []).append(record_artifact(page))
        for dest, artifacts in by_dest.items():
            try:
                mirror.publish(artifacts, dest, replace=True)
            except BuildError as e:
                raise BuildError(f"release pages: {e.message}", e.hint) from None
            lines.append(f"published {dest}/index.html to {mirror.describe()}")
    return lines
