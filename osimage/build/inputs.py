"""The build's inputs hash: one sha256 over everything that decides the image's bytes, computable
before the build takes its work folder (so "up to date" is said before any VM) and again at the
render step, which records it. Both use inputs_hash(), so the two cannot disagree.

What it covers (README.md, "Incremental builds"), each part behind its own label:
  - every file of the image folder and of templates/ (path and bytes; manifest.json left out,
    and templates/release/: the release pages on the mirror, never in an image),
  - the source: its kind (disk or iso), its checksum (image.yaml, or the site's sources.IMAGE
    override), and the bytes of the script that prepares it,
  - the backend (qemu or libvirt: another template, another builder),
  - osimage's version,
  - each feature's own part (the patch tarball's sha256, the payload's sha256).
Not in it, because they do not change the image's bytes: the accelerator, the qemu binary, the
mirror, the build folder, memory and cpus (those are in image.yaml anyway).
"""

from __future__ import annotations

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
    import hashlib

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


def inputs_hash(ctx: BuildContext, checksum: str | None = None) -> str:
    """sha256 over what decides the image (the module's docstring lists it); checksum: the
    source's, when the source step has not run yet (default: ctx.source_checksum)."""
    import hashlib

    h = hashlib.sha256()
    pages = ctx.root / "templates" / "release"
    for folder in (ctx.image.directory, ctx.root / "templates"):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name not in ("manifest.json", "manifest.json.lock") \
                    and not path.is_relative_to(pages):
                h.update(str(path.relative_to(ctx.root)).encode() + b"\0")
                h.update(path.read_bytes() + b"\0")
    src, _, _ = source_of(ctx)
    h.update(b"source:" + (b"disk" if "disk" in src else b"iso") + b":")
    h.update((checksum if checksum is not None else ctx.source_checksum).encode())
    # What image.yaml (or the site's sources) names outside the image folder: the source counts
    # by its checksum above; the script that makes it by its bytes.
    if "prepare" in src:
        h.update(b"\0prepare:" + (ctx.root / src["prepare"]).read_bytes())
    h.update(b"\0backend:" + ctx.site.backend.encode())
    h.update(b"\0osimage:" + __version__.encode())
    for feature in FEATURES:
        data = feature.inputs(ctx)
        if data:
            h.update(b"\0" + feature.name.encode() + b":" + data)
    return h.hexdigest()
