"""Layered images: an image that starts from another image's artifact (README.md, "Layered
images").

    parent: debian-base       # in images/IMAGE/image.yaml, instead of source:

The child's source is its parent's disk: for `--release X` the file release X records for the
parent in manifests/manifest.yaml, otherwise the parent's latest clean published build in
images/PARENT/manifest.json. Its sha256 is known from that record before anything runs, so it
is part of the child's inputs hash (a new parent build makes the child out of date) without a
download. Before the source step the file is fetched from the mirror into
~/.cache/osimage/parents/SHA256 (publish/download.py: resumed, hashed as it arrives, refused
when it is not the recorded file). The build's VM writes to a qcow2 overlay over it, so the
parent's bytes are not copied; the artifact is then flattened (`qemu-img convert`) into a
standalone disk that needs nothing else to boot, and the child's manifest entry records which
parent file it was made from.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from osimage import config, runner
from osimage.build.context import BuildContext, BuildOptions
from osimage.build.feature import Feature, Step
from osimage.errors import BuildError, ConfigError
from osimage.publish import artifacts, download
from osimage.release import image_manifest, tidy
from osimage.release import manifest as releases
from osimage.sizes import human

NAME = "parent"


@dataclass(frozen=True)
class ParentFile:
    """The parent's disk the child starts from, as its record names it."""

    image: str
    version: str
    release: str | None
    mirror_path: str  # builds/PARENT/VERSION/FILE on the mirror
    size: int
    sha256: str
    format: str  # qcow2 or raw: the backing file's format
    # the parent's diskless exports by kind (rootfs, oci, ...): (mirror path, size, sha256)
    exports: tuple[tuple[str, str, int, str], ...] = ()

    def export(self, kind: str) -> tuple[str, int, str] | None:
        return next(((path, size, digest) for k, path, size, digest in self.exports
                     if k == kind), None)

    @property
    def name(self) -> str:
        return PurePosixPath(self.mirror_path).name

    @property
    def local(self) -> Path:
        """The verified copy in the cache, under a name that says its format."""
        return cache_dir() / f"{self.sha256}.{self.format}"

    def record(self) -> dict[str, Any]:
        return {"image": self.image, "version": self.version, "release": self.release,
                "file": self.mirror_path, "sha256": self.sha256}


def cache_dir() -> Path:
    from osimage.build.accel import cache_home

    return cache_home() / "parents"


def _format_of(name: str) -> str:
    return "raw" if PurePosixPath(name).suffix.lower() in (".raw", ".img") else "qcow2"


def parent_of(image: config.Image) -> str | None:
    name: str | None = image.data.get("parent")
    return name


Files = list[tuple[str, int, str, str | None]]  # mirror path, size, sha256, kind


def _disk(files: Files, where: str) -> tuple[str, int, str]:
    disks = [(path, size, digest) for path, size, digest, kind in files if kind is None]
    if len(disks) != 1:
        raise ConfigError(f"{where}: {len(disks)} disk files (files without kind); a child "
                          "image starts from exactly one")
    return disks[0]


def _exports(files: Files) -> tuple[tuple[str, str, int, str], ...]:
    return tuple((kind, path, size, digest) for path, size, digest, kind in files
                 if kind is not None)


def from_release(root: Path, child: str, parent: str, release: str) -> ParentFile:
    manifest = releases.load(root)
    rel = manifest.get(release)
    entry = rel.images.get(parent)
    if entry is None:
        raise ConfigError(f"{releases.MANIFEST}: releases.{release}.images: release {release} "
                          f"records no {parent} (the parent of {child})",
                          hint=f"./build.py {parent} --release {release} && ./build.py release "
                               f"record {release} {parent}   makes and records it")
    where = f"{releases.MANIFEST}: releases.{release}.images.{parent}"
    files: Files = [(f.path, f.size, f.sha256, f.kind) for f in entry.files]
    path, size, digest = _disk(files, where)
    return ParentFile(parent, entry.version, release, path, size, digest, _format_of(path),
                      _exports(files))


def from_latest_build(root: Path, child: str, parent: str) -> ParentFile:
    path = tidy.manifest_path(root, parent)
    shown = config.display_path(path, root)
    build = tidy.latest_clean(image_manifest.read(path)["builds"])
    if build is None or not tidy.is_published(build):
        raise ConfigError(f"{shown}: builds: no clean published build of {parent}, the parent "
                          f"of {child}",
                          hint=f"./build.py {parent}   builds and publishes it (committed: "
                               "a clean build)")
    data = build["custom_data"]
    digests = data.get("sha256") or {}
    files: Files = [(f"{data['mirror_path']}/{PurePosixPath(f['name']).name}", int(f["size"]),
                     str(digests.get(f["name"], "")), f.get("kind"))
                    for f in build.get("files") or []]
    where = f"{shown}: build {data['version']}"
    mirror_path, size, digest = _disk(files, where)
    if len(digest) != 64:
        raise ConfigError(f"{where}: no sha256 recorded for {mirror_path}")
    return ParentFile(parent, str(data["version"]), None, mirror_path, size, digest,
                      _format_of(mirror_path), _exports(files))


def resolve(ctx: BuildContext) -> ParentFile | None:
    parent = parent_of(ctx.image)
    if parent is None:
        return None
    if ctx.release is not None:
        return from_release(ctx.root, ctx.image.name, parent, ctx.release)
    return from_latest_build(ctx.root, ctx.image.name, parent)


def of(ctx: BuildContext) -> ParentFile | None:
    p: ParentFile | None = ctx.state.get(NAME)
    return p


def fetch(ctx: BuildContext, mirror_path: str, size: int, sha256: str) -> download.Fetched:
    """A file of the parent's record from the mirror into the cache, checked against it."""
    shown = (config.display_path(ctx.site.path, ctx.root) if ctx.site.path is not None
             else "site.yaml")
    source = download.source_for(ctx.site.data, ctx.root, shown)
    return download.fetch(source, mirror_path, sha256, size, cache_dir(), ctx.reporter.info)


def step_fetch(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The parent's disk from the mirror, its size and sha256 checked against its record
    before anything boots it."""
    p = of(ctx)
    assert p is not None
    fetched = fetch(ctx, p.mirror_path, p.size, p.sha256)
    link = p.local.with_name(f".{p.local.name}.{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(fetched.path.name, link)
    os.replace(link, p.local)
    where = ("in the cache" if fetched.from_cache
             else f"fetched from the mirror in {fetched.seconds:.1f} s")
    ctx.reporter.info(f"    {p.mirror_path}: {human(p.size)}, sha256 {p.sha256[:16]}... as "
                      f"recorded ({where}); the build writes to an overlay over it")


def backing_file(path: Path) -> str | None:
    info = json.loads(runner.output(["qemu-img", "info", "--output=json", str(path)],
                                    what="qemu-img info"))
    backing: str | None = info.get("backing-filename")
    return backing


def step_flatten(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """A disk the VM wrote as an overlay becomes a standalone one in the image's format."""
    fmt = ctx.image.data["outputs"]["disk"].get("format", "qcow2")
    out = []
    for art in ctx.artifacts:
        if art.kind is not None or not art.path.is_file() or backing_file(art.path) is None:
            out.append(art)
            continue
        final = art.path.with_suffix(f".{fmt}")
        tmp = final.with_name(f".{final.name}.flat")
        runner.run(["qemu-img", "convert", "-O", fmt, str(art.path), str(tmp)],
                   what="qemu-img convert")
        os.replace(tmp, final)
        if final != art.path:
            art.path.unlink()
        if backing_file(final) is not None:
            raise BuildError(f"{final}: still names a backing file after qemu-img convert")
        ctx.reporter.info(f"    {final.name}: flattened into a standalone {fmt} "
                          f"({human(final.stat().st_size)})")
        out.append(artifacts.Artifact(path=final, size=0, sha256=""))
    ctx.artifacts = out


class Layer(Feature):
    name = NAME
    recorded = True

    def check_options(self, root: Path, opts: BuildOptions) -> BuildOptions:
        image = config.load_image(root, opts.image)
        parent = parent_of(image)
        if parent is not None and opts.create_patches:
            raise ConfigError(f"images/{image.name}/image.yaml: parent: --create-patches "
                              f"makes patches from an image with a source, not a layer on "
                              f"{parent}")
        return opts

    def start(self, ctx: BuildContext, asked: BuildOptions) -> None:
        p = resolve(ctx)
        if p is None:
            return
        ctx.state[NAME] = p
        # The child's source is the parent's disk: every step that reads the source (the
        # inputs hash, the backends, the mirror's size check) reads it as a disk source.
        ctx.image.data["source"] = {"disk": str(p.local), "checksum": f"sha256:{p.sha256}",
                                    "backing_format": p.format}
        what = f"release {p.release}" if p.release else "its latest clean build"
        ctx.reporter.info(f"    parent {p.image} {p.version} ({what}): {p.name}")

    def steps(self, ctx: BuildContext) -> list[Step]:
        if of(ctx) is None:
            return []
        return [Step("fetch parent", step_fetch, at="before source"),
                Step("flatten disk", step_flatten, at="after packer", needs_vm=True)]

    def record(self, ctx: BuildContext) -> dict[str, Any] | None:
        """The manifest entry's `parent`: the file the child was made from, or None."""
        p = of(ctx)
        return p.record() if p is not None else None

    def inputs(self, ctx: BuildContext) -> bytes:
        p = of(ctx)
        return f"{p.image}:{p.sha256}".encode() if p is not None else b""


FEATURE = Layer()
