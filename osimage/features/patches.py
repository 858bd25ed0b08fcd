"""Security patches in a build: `--release X` applies the patch tarball release X names in
manifests/manifest.yaml; `--create-patches` makes the next tarball and publishes it.

An image declares both steps in its image.yaml (paths relative to the image folder):

    patches:
      apply:                         # runs FIRST in a --release build, so later steps see a
        script: patches/apply.sh     #   patched system; gets OSIMAGE_PATCHES (the re-pack in
        destination: /tmp/p.tar      #   the VM), OSIMAGE_PATCHES_NAME, OSIMAGE_PATCHES_SHA256
                                     #   (the release's tarball), OSIMAGE_PATCHES_REPACK_SHA256
      create:                        # runs LAST in a --create-patches build (or before the
        script: patches/create.sh    #   provisioner `before` names); leaves the tarball at
        output: /var/tmp/patches.tar.gz  # output (also in OSIMAGE_PATCHES_OUTPUT)
        name: rocky8-patches         # published as repos/Rocky8/NAME-YYYYMMDD.tar.gz
        before: cleanup

An image without `patches.create` refuses --create-patches (exit 2). A release tarball is fetched
into the cache (publish/download.py), and its sha256 and its safety (features/tarcheck.py) and
consistency (features/patchindex.py) are checked before anything else of the build happens, its
members adding up to half the image's disk_size at most; a refused tarball ends the build with
one line and exit 1, before any VM starts. The VM gets no byte of the tarball itself: the check
writes a re-pack of exactly the members it checked (CACHE/SHA256.repack.tar, a plain tar every
tar reads alike), and that is uploaded; the build's record names both sha256s. A created
tarball is downloaded out of the VM, checked the same way, and published under repos/Rocky8/
with its sha256 file and an index (NAME-YYYYMMDD.index.json) of its advisories and packages.
The VM of a --create-patches build is not a release image: its disk is neither published nor
recorded in manifest.json, and --release is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from osimage import __version__, config
from osimage.build.context import BuildContext, BuildOptions
from osimage.build.feature import Feature, Step
from osimage.errors import ConfigError
from osimage.features import patchindex, tarcheck
from osimage.fsutil import atomic_write_text
from osimage.publish import artifacts, download
from osimage.release import commands as release
from osimage.sizes import human, parse_size

NAME = "patches"
PATCH_DIR = "repos/Rocky8"
DEFAULT_DESTINATION = "/tmp/osimage-patches.tar"
SUFFIX = {"gzip": ".tar.gz", "xz": ".tar.xz", "bzip2": ".tar.bz2", "none": ".tar"}


class PatchRefused(tarcheck.UnsafeArchive):
    """A patch tarball was refused (wrong sha256, truncated, unsafe or inconsistent)."""


@dataclass(frozen=True)
class AppliedPatches:
    """The release's patch tarball, verified, and where its local copy is."""

    name: str
    sha256: str  # the release's tarball
    mirror_path: str
    path: Path  # the re-pack of its checked members, which the VM gets
    repacked_sha256: str

    def record(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256,
                "repacked_sha256": self.repacked_sha256}


def _applied(ctx: BuildContext) -> AppliedPatches | None:
    applied: AppliedPatches | None = ctx.state.get(NAME)
    return applied


def cache_dir() -> Path:
    from osimage.build.accel import cache_home

    return cache_home() / "patches"


def _spec(image: config.Image) -> dict[str, Any]:
    spec: dict[str, Any] = image.data.get("patches") or {}
    return spec


# --- before the build ----------------------------------------------------------------------


def check_options(root: Path, image_name: str, release_name: str | None,
                  create: bool) -> str | None:
    """Check the image's patch steps; return the release the build is for (none with
    --create-patches). ConfigError (exit 2) when the image cannot --create-patches."""
    image = config.load_image(root, image_name)
    shown = f"images/{image.name}/image.yaml"
    for step, spec in _spec(image).items():
        if not (image.directory / spec["script"]).is_file():
            raise ConfigError(f"{shown}: patches.{step}.script: {spec['script']!r} does not "
                              f"exist in images/{image.name}/")
    before = _spec(image).get("create", {}).get("before")
    if before is not None and before not in image.provisioner_names:
        raise ConfigError(f"{shown}: patches.create.before: {before!r} is not a provisioner "
                          f"(provisioners: {', '.join(image.provisioner_names)})")
    if create and "create" not in _spec(image):
        able = [n for n in config.list_images(root) if _declares_create(root, n)]
        raise ConfigError(f"{shown}: patches.create: {image.name} declares no create step, so "
                          f"it cannot --create-patches (images that can: "
                          f"{', '.join(able) or 'none'})")
    return None if create else release_name


def _declares_create(root: Path, name: str) -> bool:
    with contextlib.suppress(ConfigError):
        data = config.read_yaml(root / "images" / name / "image.yaml", name)
        return isinstance(data, dict) and "create" in (data.get("patches") or {})
    return False


def start(ctx: BuildContext, create: bool, ignored_release: str | None) -> None:
    if create:
        ctx.reporter.info("    --create-patches: the build makes the next patch tarball for "
                          f"{PATCH_DIR}/; its disk is neither published nor recorded")
        if ignored_release is not None:
            ctx.reporter.warn(f"--release {ignored_release} is ignored with --create-patches: "
                              "the VM that makes patches is larger than a release build")


# --- --release: fetch, verify and check the release's tarball --------------------------------


def _to_apply(ctx: BuildContext) -> release.Patches | None:
    """The tarball release X records, when this build applies one."""
    if ctx.release is None or ctx.create_patches or "apply" not in _spec(ctx.image):
        return None
    manifest = release.load(ctx.root)
    if ctx.release not in manifest.names:
        return None
    return manifest.get(ctx.release).patches


def step_fetch(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The release's patch tarball, verified and checked, before anything else happens."""
    assert ctx.release is not None
    manifest = release.load(ctx.root)
    if ctx.release not in manifest.names:
        ctx.reporter.warn(f"release {ctx.release} is not in {release.MANIFEST}: no patch "
                          "tarball is applied")
        return
    patches = manifest.get(ctx.release).patches
    if patches is None:
        ctx.reporter.info(f"    release {ctx.release} names no patch tarball")
        return
    name = PurePosixPath(patches.path).name
    if "apply" not in _spec(ctx.image):
        ctx.reporter.info(f"    {ctx.image.name} declares no patches.apply step: {name} of "
                          f"release {ctx.release} is not applied")
        return
    source = _source(ctx)
    for attempt in range(2):
        fetched = download.fetch(source, patches.path, patches.sha256, patches.size,
                                 cache_dir(), ctx.reporter.info)
        repack = _repack_path(patches.sha256)
        contents = tarcheck.inspect(fetched.path, keep=patchindex.keep,
                                    digest=patchindex.digest, limits=limits_for(ctx.image),
                                    repack_to=repack)
        if contents.sha256 == patches.sha256:
            break
        # A file in the cache was verified when it arrived: this one was changed since.
        fetched.path.unlink(missing_ok=True)
        repack.unlink(missing_ok=True)
        if attempt:
            raise PatchRefused(f"{patches.path}: sha256 {contents.sha256[:16]}... after "
                               f"download, the release says {patches.sha256[:16]}...; refused")
        ctx.reporter.warn(f"the cached copy of {name} was damaged; downloading it again")
    try:
        patch_set = _checked(patches.path, contents, fetched.path)
    except PatchRefused:
        repack.unlink(missing_ok=True)
        raise
    kept = cache_dir() / f"{patches.sha256}.repack.tar"
    os.replace(repack, kept)
    if fetched.from_cache:
        ctx.reporter.info(f"    {name}: in the cache ({fetched.path})")
    else:
        resumed = f", resumed at {human(fetched.resumed_at)}" if fetched.resumed_at else ""
        ctx.reporter.info(f"    {name}: downloaded {human(fetched.downloaded)} from "
                          f"{source.describe()} in {fetched.seconds:.1f} s{resumed}")
    ctx.reporter.info(f"    {name}: sha256 {contents.sha256} ok; a safe archive of "
                      f"{contents.members} members ({human(contents.total_bytes)}); "
                      f"{_summary(patch_set)}")
    ctx.reporter.info(f"    {name}: the VM gets a re-pack of exactly those members, sha256 "
                      f"{contents.repack_sha256}")
    ctx.state[NAME] = AppliedPatches(name=name, sha256=patches.sha256, mirror_path=patches.path,
                                 path=kept, repacked_sha256=contents.repack_sha256)


def limits_for(image: config.Image) -> tarcheck.Limits:
    """The tarball and what it unpacks to must both fit on the image's disk."""
    size = str(image.data["disk_size"])
    return tarcheck.Limits().for_disk(parse_size(size), f"half the image's disk_size {size}")


def _repack_path(sha256: str) -> Path:
    """The re-pack of a tarball is a function of its bytes, kept beside it in the cache; it is
    written under a name of this process's own and renamed once the whole check passed."""
    return cache_dir() / f"{sha256}.repack.{os.getpid()}.tar"


def _source(ctx: BuildContext) -> download.Source:
    shown = (config.display_path(ctx.site.path, ctx.root) if ctx.site.path is not None
             else "site.yaml")
    return download.source_for(ctx.site.data, ctx.root, shown)


def _checked(shown: str, contents: tarcheck.Contents, path: Path) -> patchindex.PatchSet:
    if contents.problem is not None:
        raise PatchRefused(f"{shown}: refused: {contents.problem}")

    def digests(algorithm: str) -> dict[str, str]:
        again = tarcheck.inspect(path, digest=patchindex.digest, algorithm=algorithm)
        return again.digests

    try:
        return patchindex.read(contents, digests)
    except patchindex.PatchContentError as e:
        raise PatchRefused(f"{shown}: refused: {e}") from None


def _summary(p: patchindex.PatchSet) -> str:
    return (f"{len(p.advisories)} advisor{'y' if len(p.advisories) == 1 else 'ies'}, "
            f"{len(p.packages)} package{'' if len(p.packages) == 1 else 's'}")


# --- the Packer steps ------------------------------------------------------------------------


def created_path(ctx: BuildContext) -> Path:
    """Where Packer downloads the created tarball to."""
    return ctx.work_dir / "patches-created.tar"


def _env_list(env: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(env.items())]


# --- --create-patches: check, index and publish the created tarball ---------------------------


def step_collect(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The tarball Packer downloaded out of the VM: checked, named, hashed, indexed."""
    spec = _spec(ctx.image)["create"]
    got = created_path(ctx)
    if not got.is_file() or got.stat().st_size == 0:
        raise PatchRefused(f"the create step left no tarball at {spec['output']} in the VM")
    contents = tarcheck.inspect(got, keep=patchindex.keep, digest=patchindex.digest,
                                limits=limits_for(ctx.image))
    patch_set = _checked(f"the created tarball ({got})", contents, got)
    # The VM's disk holds the downloaded packages: it is no release image, drop it now.
    shutil.rmtree(ctx.output_dir, ignore_errors=True)
    name = _publish_name(ctx, spec.get("name", f"{ctx.image.name}-patches"),
                         SUFFIX[contents.compression])
    out = ctx.work_dir / "patches"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tarball = out / name
    os.replace(got, tarball)
    index = out / (name.removesuffix(SUFFIX[contents.compression]) + ".index.json")
    doc = patchindex.document(
        patch_set, name=name, path=f"{PATCH_DIR}/{name}", sha256=contents.sha256,
        size=contents.size, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        image=ctx.image.name, version=ctx.version, git_commit=ctx.git.commit,
        dirty=ctx.git.dirty, osimage_version=__version__)
    atomic_write_text(index, json.dumps(doc, indent=2) + "\n")
    made = artifacts.Artifact(path=tarball, size=contents.size, sha256=contents.sha256)
    artifacts.write_checksum_file(made)
    ctx.artifacts = [made, artifacts.record(index)]
    ctx.reporter.info(f"    {name}: {human(contents.size)}, sha256 {contents.sha256}; "
                      f"{_summary(patch_set)}")
    for a in patch_set.advisories:
        ctx.reporter.info(f"      {a.id} {a.type}: {', '.join(a.packages)}")


def _publish_name(ctx: BuildContext, prefix: str, suffix: str) -> str:
    """PREFIX-YYYYMMDD, or PREFIX-YYYYMMDD.N when the mirror has that name already (a
    published tarball is never replaced); with the time when the mirror cannot be asked."""
    now = time.gmtime()
    day = time.strftime("%Y%m%d", now)
    try:
        source = _source(ctx)
    except ConfigError:
        return f"{prefix}-{day}T{time.strftime('%H%M%S', now)}Z{suffix}"
    for n in range(1, 1000):
        name = f"{prefix}-{day}{'' if n == 1 else f'.{n}'}{suffix}"
        if not source.exists(f"{PATCH_DIR}/{name}"):
            return name
    raise PatchRefused(f"{PATCH_DIR}/{prefix}-{day}: 999 tarballs today already")


def step_publish(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    mirror = ctx.mirror()
    ctx.mirror_paths = mirror.publish(ctx.artifacts, PATCH_DIR)
    ctx.reporter.info(f"    {mirror.describe()}: {', '.join(ctx.mirror_paths)}")


class Patches(Feature):
    name = NAME
    recorded = True

    def check_options(self, root: Path, opts: BuildOptions) -> BuildOptions:
        return replace(opts, release=check_options(root, opts.image, opts.release,
                                                   opts.create_patches))

    def start(self, ctx: BuildContext, asked: BuildOptions) -> None:
        start(ctx, asked.create_patches, asked.release if asked.create_patches else None)

    def steps(self, ctx: BuildContext) -> list[Step]:
        if ctx.create_patches:
            return [Step("collect patch tarball", step_collect, at="after packer"),
                    Step("publish patch tarball", step_publish, at="after packer",
                         publishes=True)]
        if ctx.release is None:
            return []
        # before anything else of a --release build: a refused tarball starts no VM
        return [Step("security patches", step_fetch, at="before source")]

    def skips(self, ctx: BuildContext) -> set[str]:
        """The VM of a --create-patches build is no release image: its disk is neither
        hashed, published nor recorded."""
        if not ctx.create_patches:
            return set()
        return {"artifacts", "publish", "record", "check release", "check published"}

    def provisioners(self, ctx: BuildContext, provs: list[dict[str, Any]],
                     env: dict[str, str]) -> list[dict[str, Any]]:
        """The image's provisioners with the patch steps: upload + apply first (--release
        with a tarball), or create + download last (--create-patches)."""
        spec = _spec(ctx.image)
        applied = _applied(ctx)
        if applied is not None:
            apply = spec["apply"]
            dest = apply.get("destination", DEFAULT_DESTINATION)
            merged = {**env, **apply.get("environment", {}), "OSIMAGE_PATCHES": dest,
                      "OSIMAGE_PATCHES_NAME": applied.name,
                      "OSIMAGE_PATCHES_SHA256": applied.sha256,
                      "OSIMAGE_PATCHES_REPACK_SHA256": applied.repacked_sha256}
            return [{"name": "patches-upload", "type": "file", "source": str(applied.path),
                     "destination": dest},
                    {"name": "patches-apply", "type": "shell",
                     "script": str(ctx.image.directory / apply["script"]),
                     "env_list": _env_list(merged)},
                    *provs]
        if ctx.create_patches:
            create = spec["create"]
            # Packer writes a download into an existing file without truncating it.
            created_path(ctx).unlink(missing_ok=True)
            merged = {**env, **create.get("environment", {}),
                      "OSIMAGE_PATCHES_OUTPUT": create["output"]}
            steps = [{"name": "patches-create", "type": "shell",
                      "script": str(ctx.image.directory / create["script"]),
                      "env_list": _env_list(merged)},
                     {"name": "patches-download", "type": "file", "direction": "download",
                      "source": create["output"], "destination": str(created_path(ctx))}]
            at = len(provs)
            if "before" in create:  # e.g. before a cleanup that removes the build's key
                at = next(i for i, p in enumerate(provs) if p.get("name") == create["before"])
                while at and provs[at - 1].get("name") == f"break-before-{create['before']}":
                    at -= 1
            return [*provs[:at], *steps, *provs[at:]]
        return provs

    def record(self, ctx: BuildContext) -> dict[str, str] | None:
        """The manifest entry's `patches`: the applied tarball's name and sha256, or None."""
        applied = _applied(ctx)
        return applied.record() if applied is not None else None

    def inputs(self, ctx: BuildContext) -> bytes:
        """The sha256 the release records for the tarball the build applies: known before it
        is fetched (step_fetch refuses any other bytes), so a --release build can be up to
        date."""
        recorded = _to_apply(ctx)
        return recorded.sha256.encode() if recorded is not None else b""


FEATURE = Patches()
