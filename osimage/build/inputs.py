"""The build's inputs hash: one sha256 over everything that decides the image's bytes, computable
before the build takes its work folder (so "up to date" is said before any VM) and again at the
render step, which records it. Both use inputs_hash(), so the two cannot disagree.

What it covers (README.md, "Incremental builds"), each part behind its own label:
  - every file of the image folder and of templates/ (path and bytes; manifest.json left out),
  - the source: its kind (disk or iso), its checksum (image.yaml, or the site's sources.IMAGE
    override), and the bytes of the script that prepares it,
  - the backend (qemu or libvirt: another template, another builder),
  - osimage's version,
  - each feature's own part (the patch tarball's sha256, the payload's sha256).
Not in it, because they do not change the image's bytes: the accelerator, the qemu binary, the
mirror, the build folder, memory and cpus (those are in image.yaml anyway).

Each part is also hashed on its own under its name (NAMES, then each feature's name), and the
build records these beside the total (manifest.json: custom_data.inputs), so a later run says
which input changed. The total is fed the same bytes in the same order as before the parts had
names, so builds recorded before still compare equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osimage import __version__, config
from osimage.build.context import BuildContext
from osimage.errors import ConfigError
from osimage.features.registry import FEATURES
from osimage.publish import artifacts


def resolve_location(root: Path, value: str) -> str:
    if "://" in value:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else root / path)


def prepared(script: Path, target: Path) -> bool:
    """The source a prepare script makes is there and made by this version of the script."""
    stamp = target.parent / ".prepare-stamp"
    try:
        return target.exists() and stamp.read_text().strip() == hashlib.sha256(
            script.read_bytes()).hexdigest()
    except OSError:
        return False


def source_of(ctx: BuildContext) -> tuple[dict[str, Any], str, str]:
    """The source the build uses (the site's sources.IMAGE overrides image.yaml's), the file
    that names it and the key, for error messages."""
    override = ctx.site.data.get("sources", {}).get(ctx.image.name)
    if override is not None:
        shown = config.display_path(ctx.site.path, ctx.root) if ctx.site.path else "site.yaml"
        return override, shown, f"sources.{ctx.image.name}"
    return ctx.image.data["source"], f"images/{ctx.image.name}/image.yaml", "source"


def source_checksum(ctx: BuildContext) -> str:
    """sha256:HEX (or Packer's file:URL for a remote checksum file) of the build's source."""
    src, shown, key = source_of(ctx)
    location = src.get("disk") or src["iso"]
    checksum: str = src["checksum"]
    if not checksum.startswith("file:"):
        return checksum
    ref = checksum.removeprefix("file:")
    if "://" in ref:
        return checksum  # Packer fetches and checks it
    path = Path(resolve_location(ctx.root, ref))
    try:
        text = path.read_text()
    except OSError:
        raise ConfigError(f"{shown}: {key}.checksum: cannot read {ref}") from None
    digest = artifacts.parse_checksum_file(text, Path(location).name)
    if digest is None:
        raise ConfigError(f"{shown}: {key}.checksum: no sha256 for "
                          f"{Path(location).name} in {ref}")
    return f"sha256:{digest}"


# The named inputs, in the order they are hashed; the features' parts follow under their names.
IMAGE_FOLDER = "image folder"  # every file of images/NAME/ (path and bytes)
TEMPLATES = "templates"  # every file of templates/
SOURCE = "source"  # its kind (disk or iso) and checksum: image.yaml, or the site's sources.NAME
PREPARE = "source.prepare"  # the bytes of the script that makes the source
BACKEND = "backend"  # the site's backend: another template, another builder
OSIMAGE = "osimage"  # osimage's version
NAMES = (IMAGE_FOLDER, TEMPLATES, SOURCE, PREPARE, BACKEND, OSIMAGE)
STATE_KEY = "inputs"  # where a build keeps its parts (ctx.state), and its record has them


@dataclass(frozen=True)
class Inputs:
    """The inputs hash and the hash of each named input."""

    total: str
    parts: dict[str, str]


class _Hasher:
    """The total hash and one hash per named input, fed the same bytes."""

    def __init__(self) -> None:
        self.total = hashlib.sha256()
        self.parts: dict[str, Any] = {}

    def add(self, name: str, data: bytes) -> None:
        self.total.update(data)
        self.parts.setdefault(name, hashlib.sha256()).update(data)

    def result(self) -> Inputs:
        return Inputs(self.total.hexdigest(), {k: v.hexdigest() for k, v in self.parts.items()})


def compute(ctx: BuildContext, checksum: str | None = None) -> Inputs:
    """The inputs of the build (the module's docstring lists them); checksum: the source's,
    when the source step has not run yet (default: ctx.source_checksum)."""
    h = _Hasher()
    for name, folder in ((IMAGE_FOLDER, ctx.image.directory), (TEMPLATES, ctx.root / "templates")):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name not in ("manifest.json", "manifest.json.lock"):
                h.add(name, str(path.relative_to(ctx.root)).encode() + b"\0")
                h.add(name, path.read_bytes() + b"\0")
    src, _, _ = source_of(ctx)
    h.add(SOURCE, b"source:" + (b"disk" if "disk" in src else b"iso") + b":")
    h.add(SOURCE, (checksum if checksum is not None else ctx.source_checksum).encode())
    # What image.yaml (or the site's sources) names outside the image folder: the source counts
    # by its checksum above; the script that makes it by its bytes.
    if "prepare" in src:
        h.add(PREPARE, b"\0prepare:" + (ctx.root / src["prepare"]).read_bytes())
    h.add(BACKEND, b"\0backend:" + ctx.site.backend.encode())
    h.add(OSIMAGE, b"\0osimage:" + __version__.encode())
    for feature in FEATURES:
        data = feature.inputs(ctx)
        if data:
            h.add(feature.name, b"\0" + feature.name.encode() + b":" + data)
    return h.result()


def inputs_hash(ctx: BuildContext, checksum: str | None = None) -> str:
    """The inputs hash (compute()); the build keeps the parts for its record."""
    found = compute(ctx, checksum)
    ctx.state[STATE_KEY] = found.parts
    return found.total
