"""A child image's OCI export as its parent's OCI image plus one layer (README.md, "Layered
images"): a registry that has the parent stores and sends only the difference.

The parent's published NAME-oci.tar gives the lower layers and config, byte for byte (so their
digests are the parent's); the parent's published rootfs tar is the tree they unpack to. The
child's rootfs tar is compared with it member by member: type, mode, owner, link target,
device numbers, extended attributes (PAX SCHILY.xattr.*) and content. File times are not
compared: each build's rootfs script clamps them to its own commit's time, so every file would
differ. The new layer holds what the child added or changed (with the folders above it, and
the targets of its hard links) and an OCI whiteout (`.wh.NAME`) for each path the child no
longer has (one for a removed folder, none for what was inside it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from osimage.errors import BuildError

Signature = tuple[Any, ...]
WHITEOUT = ".wh."


def _norm(name: str) -> str:
    path = name.removeprefix("./").strip("/")
    return "" if path == "." else path


def _xattrs(m: tarfile.TarInfo) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in m.pax_headers.items()
                        if k.startswith("SCHILY.xattr.")))


def tree_of(tar: Path) -> dict[str, Signature]:
    """path -> what decides its content once unpacked (not its time)."""
    tree: dict[str, Signature] = {}
    links: dict[str, str] = {}
    try:
        with tarfile.open(tar) as t:
            for m in t:
                path = _norm(m.name)
                if not path:
                    continue
                meta = (m.mode & 0o7777, m.uid, m.gid, _xattrs(m))
                if m.islnk():
                    links[path] = _norm(m.linkname)
                    continue
                if m.isfile():
                    f = t.extractfile(m)
                    assert f is not None
                    h = hashlib.sha256()
                    while block := f.read(1 << 20):
                        h.update(block)
                    tree[path] = ("file", *meta, h.hexdigest())
                elif m.issym():
                    tree[path] = ("symlink", *meta, m.linkname)
                elif m.isdir():
                    tree[path] = ("dir", *meta)
                else:
                    tree[path] = ("other", m.type, *meta, m.devmajor, m.devminor)
    except tarfile.TarError as e:
        raise BuildError(f"{tar.name}: not a readable tar: {e}") from None
    for path, target in links.items():  # a hard link is its target's content
        tree[path] = ("link", target, tree.get(target))
    return tree


@dataclass(frozen=True)
class Diff:
    changed: frozenset[str]  # added or changed in the child
    deleted: tuple[str, ...]  # gone in the child: one whiteout each

    def describe(self) -> str:
        return f"{len(self.changed)} added or changed, {len(self.deleted)} removed"


def _ancestors(path: str) -> list[str]:
    return [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]


def diff(lower: dict[str, Signature], upper: dict[str, Signature]) -> Diff:
    changed = frozenset(p for p, sig in upper.items() if lower.get(p) != sig)
    gone = {p for p in lower if p not in upper}
    # a removed folder hides what was in it; a folder replaced by a file does too
    replaced = {p for p in changed if upper[p][0] != "dir" and lower.get(p, ("dir",))[0] == "dir"}
    deleted = tuple(sorted(p for p in gone if not any(
        a in gone or a in replaced for a in _ancestors(p))))
    return Diff(changed, deleted)


def write_layer(child_tar: Path, d: Diff, out: Path, epoch: int) -> int:
    """The layer tar: whiteouts first, then the child's changed members in its own order, with
    the folders above them and the targets of hard links among them. Returns its members."""
    with tarfile.open(child_tar) as t:
        members = [m for m in t.getmembers() if _norm(m.name)]
    by_path = {_norm(m.name): m for m in members}
    keep = set(d.changed)
    for path in list(d.changed):
        m = by_path[path]
        if m.islnk():
            keep.add(_norm(m.linkname))
    for path in list(keep) + list(d.deleted):
        keep.update(a for a in _ancestors(path) if a in by_path)
    count = 0
    with tarfile.open(child_tar) as src, tarfile.open(out, "w",
                                                       format=tarfile.PAX_FORMAT) as dst:
        for path in d.deleted:
            parent, name = PurePosixPath(path).parent, PurePosixPath(path).name
            wh = tarfile.TarInfo(str(parent / f"{WHITEOUT}{name}") if str(parent) != "."
                                 else f"{WHITEOUT}{name}")
            wh.mtime, wh.mode, wh.uid, wh.gid = epoch, 0o644, 0, 0
            dst.addfile(wh)
            count += 1
        for m in src:
            if _norm(m.name) not in keep:
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            count += 1
    return count


def parent_tag(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    tags = [d.get("annotations", {}).get("org.opencontainers.image.ref.name")
            for d in index.get("manifests", [])]
    if len(tags) != 1 or not tags[0]:
        raise BuildError(f"{layout}: the parent's OCI archive holds {len(tags)} tagged images, "
                         "not one")
    return str(tags[0])


def unpack_layout(archive: Path, layout: Path) -> str:
    """The parent's NAME-oci.tar as an OCI layout (its blobs as they are); its tag."""
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    with tarfile.open(archive) as t:
        t.extractall(layout, filter="data")
    (layout / "manifest.json").unlink(missing_ok=True)  # the docker-archive view only
    return parent_tag(layout)


def layered(parent_archive: Path, parent_rootfs: Path, child_rootfs: Path, layout: Path,
            tag: str, epoch: int, umoci: Callable[..., None], created: str,
            created_by: str) -> Diff:
    """layout:tag = the parent's image plus one layer of the child's changes."""
    lower = unpack_layout(parent_archive, layout)
    d = diff(tree_of(parent_rootfs), tree_of(child_rootfs))
    layer = layout.parent / "child-layer.tar"
    try:
        write_layer(child_rootfs, d, layer, epoch)
        umoci("raw", "add-layer", "--image", f"{layout}:{lower}", "--tag", tag,
              "--history.created", created, "--history.created_by", created_by, str(layer))
    finally:
        layer.unlink(missing_ok=True)
    return d
