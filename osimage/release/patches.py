"""`./build.py release set-patches RELEASE PATH`: put a published patch tarball into a release.

The size and sha256 are read from the mirror (the whole tarball is hashed), never typed: they
must agree with the `.sha256` file the publication wrote beside the tarball, with its index
(NAME.index.json: its sha256 and size) when there is one, and with --sha256 when given. Any
disagreement, or a tarball that is not on the mirror, refuses the command with one line and
manifests/manifest.yaml unchanged. A release that names another tarball keeps it unless --force.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from osimage.errors import ConfigError
from osimage.features.patches import PATCH_DIR, SUFFIX
from osimage.release import commands as release
from osimage.release.commands import (
    SHA256,
    MirrorReader,
    ReleaseError,
)
from osimage.release.manifest import put

MAX_SIDE_FILE = 1 << 20  # a .sha256 or index.json beside the tarball


def _check_path(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or str(pure) != path.rstrip("/"):
        raise ConfigError(f"{path}: PATH: a path on the mirror such as "
                          f"{PATCH_DIR}/rocky8-patches-20261126.tar.gz")
    if not any(path.endswith(s) for s in SUFFIX.values()):
        raise ConfigError(f"{path}: PATH: not a tarball (expected "
                          f"{', '.join(sorted(SUFFIX.values()))})")
    return str(pure)


def read_side_file(reader: MirrorReader, path: str) -> bytes | None:
    """A .sha256, index.json or signature file from the mirror, or None when it is not there."""
    return release.read_small(reader, path, MAX_SIDE_FILE)


def _published(reader: MirrorReader, path: str) -> list[tuple[str, str, int | None]]:
    """(where, sha256, size or None) as the files published beside the tarball give them."""
    out: list[tuple[str, str, int | None]] = []
    side = read_side_file(reader, f"{path}.sha256")
    if side is not None:
        words = side.decode(errors="replace").split()
        if not words or not SHA256.match(words[0]):
            raise ReleaseError(f"{path}.sha256 on the {reader.describe()}: not a sha256 line")
        out.append((f"{path}.sha256", words[0], None))
    stem = next((path.removesuffix(s) for s in SUFFIX.values() if path.endswith(s)), path)
    index = read_side_file(reader, f"{stem}.index.json")
    if index is not None:
        try:
            doc: Any = json.loads(index)
            out.append((f"{stem}.index.json", str(doc["sha256"]), int(doc["size"])))
        except (ValueError, KeyError, TypeError):
            raise ReleaseError(f"{stem}.index.json on the {reader.describe()}: not a patch "
                               "index (no sha256 and size)") from None
    return out


def set_patches(root: Path, name: str, path: str, sha256: str | None, force: bool,
                reader: MirrorReader, say: Callable[[str], None]) -> release.Release:
    """Release name's patches become path, with the size and sha256 the mirror has."""
    release.check_release_name(name)
    path = _check_path(path)
    if sha256 is not None and not SHA256.match(sha256):
        raise ConfigError(f"--sha256: {sha256!r} is not 64 lowercase hex digits")
    _refuse_other(release.load(root).doc, name, path, force)
    claims = _published(reader, path)
    if sha256 is not None:
        claims.append(("--sha256", sha256, None))
    if not claims:
        raise ReleaseError(f"{path}: no {path}.sha256 beside it on the {reader.describe()}: "
                           "not a published patch tarball",
                           hint="pass --sha256 HEX with the sha256 it must have")
    got = reader.measure(path)
    if got.problem is not None or got.size is None or got.sha256 is None:
        raise ReleaseError(f"{path}: {got.problem or 'cannot be read'} ({reader.describe()})")
    for where, want, size in claims:
        if want != got.sha256:
            raise ReleaseError(f"{path}: sha256 {got.sha256[:16]}... on the "
                               f"{reader.describe()}, {where} says {want[:16]}...; refused")
        if size is not None and size != got.size:
            raise ReleaseError(f"{path}: {got.size} bytes on the {reader.describe()}, "
                               f"{where} says {size}; refused")
    say(f"    {path}: {got.size} bytes, sha256 {got.sha256} (agrees with "
        f"{', '.join(w for w, _, _ in claims)})")
    entry = {"path": path, "sha256": got.sha256, "size": got.size}

    def change(doc: Any) -> None:
        _refuse_other(doc, name, path, force)
        releases = doc["releases"]
        if name not in releases:
            put(releases, name, {"patches": entry, "images": {}})
        else:  # comments around the release stay where they were
            put(releases[name], "patches", entry)

    release.edit(root, change)
    return release.load(root).get(name)


def _refuse_other(doc: Any, name: str, path: str, force: bool) -> None:
    release.refuse_signed(doc, name)
    current = doc["releases"].get(name, {}).get("patches") if name in doc["releases"] else None
    if force or current is None or current.get("path") == path:
        return
    raise ReleaseError(f"{release.MANIFEST}: release {name} already names the patch tarball "
                       f"{current.get('path')}", hint="pass --force to replace it")
