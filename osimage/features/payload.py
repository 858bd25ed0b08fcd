"""A release's image embedded in the image being built (usb-installer carries rocky8-base).

An image declares what it embeds in its image.yaml:

    payload:
      image: rocky8-base                 # the disk file of this image in the release ...
      destination: /mnt/osimage-payload  # ... is uploaded into this folder of the VM ...
      after: partition                   # ... right after this provisioner (default: first)
      reserve: 1G                        # disk_size must hold the payload and this much more

Such an image is built for a release only: `--release X` takes the disk file recorded for the
payload image in manifests/manifest.yaml; without --release, or when release X has no entry for
it, the build refuses before anything runs (exit 2). The file is fetched from the mirror into
~/.cache/osimage/payloads/SHA256 and its size and sha256 are checked against the release before
Packer starts (exit 1 when they differ: nothing is embedded); the provisioners after the upload
get OSIMAGE_PAYLOAD_FILE, _SHA256, _SIZE, _DIR, _IMAGE, _VERSION and _RELEASE to check it again
in the VM. `./build.py render` without --release renders with an empty stand-in file.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from osimage import config
from osimage.build.context import BuildContext, BuildOptions
from osimage.build.feature import Feature, Step
from osimage.errors import ConfigError
from osimage.publish import download
from osimage.release import commands as release
from osimage.sizes import human, parse_size

NAME = "payload"
STAND_IN = "payload-stand-in.raw"  # the file `render` without --release uploads instead


@dataclass(frozen=True)
class Payload:
    image: str
    release: str | None
    version: str | None
    name: str  # file name in the VM (the mirror file's name)
    mirror_path: str | None
    size: int
    sha256: str
    local: Path  # what Packer uploads: build/IMAGE/VERSION/payload/NAME
    destination: str  # folder in the VM
    after: str | None

    @property
    def env(self) -> dict[str, str]:
        return {"OSIMAGE_PAYLOAD_FILE": self.name, "OSIMAGE_PAYLOAD_SHA256": self.sha256,
                "OSIMAGE_PAYLOAD_SIZE": str(self.size), "OSIMAGE_PAYLOAD_DIR": self.destination,
                "OSIMAGE_PAYLOAD_IMAGE": self.image,
                "OSIMAGE_PAYLOAD_VERSION": self.version or "",
                "OSIMAGE_PAYLOAD_RELEASE": self.release or ""}


def _payload(ctx: BuildContext) -> Payload | None:
    p: Payload | None = ctx.state.get(NAME)
    return p


def spec_of(image: config.Image) -> dict[str, Any] | None:
    spec: dict[str, Any] | None = image.data.get("payload")
    return spec


def check_options(root: Path, image_name: str, release_name: str | None) -> None:
    """A build of an image with a payload needs --release, and the release needs the payload
    image: otherwise exit 2 before anything is printed or started."""
    image = config.load_image(root, image_name)
    spec = spec_of(image)
    if spec is None:
        return
    shown = f"images/{image.name}/image.yaml"
    if release_name is None:
        raise ConfigError(f"{shown}: payload: {image.name} embeds the {spec['image']} disk of a "
                          f"release: build it with --release X (a release recorded in "
                          f"{release.MANIFEST})",
                          hint=f"./build.py release show   lists the releases; "
                               f"./build.py render {image.name} renders without one")
    _disk_file(root, image, spec, release_name)


def _disk_file(root: Path, image: config.Image, spec: dict[str, Any],
               release_name: str) -> tuple[release.ImageEntry, release.FileEntry]:
    entry = release.load(root).image(release_name, spec["image"])
    disks = [f for f in entry.files if f.kind is None]
    if len(disks) != 1:
        raise ConfigError(f"{release.MANIFEST}: releases.{release_name}.images.{spec['image']}: "
                          f"{len(disks)} disk files (files without kind); {image.name} embeds "
                          "exactly one")
    return entry, disks[0]


def step_resolve(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """Which file is embedded, and a stand-in at its place until it is fetched, so that the
    rendered HCL validates (Packer checks that a file provisioner's source exists)."""
    spec = spec_of(ctx.image)
    if spec is None:
        return
    folder = ctx.work_dir / "payload"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    if ctx.release is None:  # `render` only: check_options refuses a build without a release
        local = folder / STAND_IN
        local.touch()
        ctx.state[NAME] = Payload(image=spec["image"], release=None, version=None, name=STAND_IN,
                              mirror_path=None, size=0, sha256="0" * 64, local=local,
                              destination=spec["destination"], after=spec.get("after"))
        ctx.reporter.warn(f"no --release: the HCL uploads an empty stand-in for the "
                          f"{spec['image']} disk; a build embeds the release's file")
        return
    entry, disk = _disk_file(ctx.root, ctx.image, spec, ctx.release)
    name = PurePosixPath(disk.path).name
    capacity = parse_size(ctx.image.data["disk_size"]) - parse_size(spec.get("reserve", "1G"))
    if disk.size > capacity:
        raise ConfigError(f"images/{ctx.image.name}/image.yaml: disk_size "
                          f"{ctx.image.data['disk_size']} cannot hold {name} ({human(disk.size)}) "
                          f"and payload.reserve {spec.get('reserve', '1G')}: raise disk_size")
    local = folder / name
    local.touch()
    ctx.state[NAME] = Payload(image=spec["image"], release=ctx.release, version=entry.version,
                          name=name, mirror_path=disk.path, size=disk.size, sha256=disk.sha256,
                          local=local, destination=spec["destination"], after=spec.get("after"))
    ctx.reporter.info(f"    {spec['image']} {entry.version} of release {ctx.release}: {name}, "
                      f"{human(disk.size)}, sha256 {disk.sha256}")


def cache_dir() -> Path:
    from osimage.build.accel import cache_home

    return cache_home() / "payloads"


def step_fetch(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The release's file from the mirror, its size and sha256 checked against the release
    before Packer may upload it."""
    p = _payload(ctx)
    if p is None:
        return
    assert p.mirror_path is not None, "a build has a release (check_options)"
    shown = (config.display_path(ctx.site.path, ctx.root) if ctx.site.path is not None
             else "site.yaml")
    source = download.source_for(ctx.site.data, ctx.root, shown)
    ctx.reporter.info(f"    {p.mirror_path} from the {source.describe()}")
    fetched = download.fetch(source, p.mirror_path, p.sha256, p.size, cache_dir(),
                             ctx.reporter.info)
    where = "in the cache" if fetched.from_cache else f"fetched in {fetched.seconds:.1f} s"
    # Packer uploads what the link points at: the verified file, under the release's name.
    p.local.unlink(missing_ok=True)
    os.symlink(fetched.path, p.local)
    ctx.reporter.info(f"    {p.name}: size and sha256 match release {p.release} ({where}: "
                      f"{fetched.path})")


class Embedded(Feature):
    name = NAME
    recorded = True

    def check_options(self, root: Path, opts: BuildOptions) -> BuildOptions:
        if not opts.render_only:  # render without --release uploads a stand-in
            check_options(root, opts.image, opts.release)
        return opts

    def steps(self, ctx: BuildContext) -> list[Step]:
        if spec_of(ctx.image) is None:
            return []
        return [Step("resolve payload", step_resolve, at="after source"),
                Step("fetch payload", step_fetch, at="before packer")]

    def provisioners(self, ctx: BuildContext, provs: list[dict[str, Any]],
                     env: dict[str, str]) -> list[dict[str, Any]]:
        """The upload of the payload after the provisioner named in payload.after (or first), and
        OSIMAGE_PAYLOAD_* in the environment of every shell provisioner."""
        p = _payload(ctx)
        if p is None:
            return provs
        upload = {"name": "payload-upload", "type": "file", "source": str(p.local),
                  "destination": f"{p.destination.rstrip('/')}/{p.name}"}
        extra = [f"{k}={v}" for k, v in sorted(p.env.items())]
        out: list[dict[str, Any]] = [] if p.after is not None else [upload]
        for prov in provs:
            shell = prov.get("type") == "shell"
            out.append({**prov, "env_list": [*prov.get("env_list", []), *extra]} if shell else prov)
            if p.after is not None and prov.get("name") == p.after:
                out.append(upload)
        if p.after is not None and upload not in out:
            raise ConfigError(f"images/{ctx.image.name}/image.yaml: payload.after: no provisioner "
                              f"named {p.after!r}")
        return out

    def record(self, ctx: BuildContext) -> dict[str, Any] | None:
        """The build's manifest entry's `payload`: what was embedded, or None."""
        p = _payload(ctx)
        if p is None:
            return None
        return {"image": p.image, "release": p.release, "version": p.version,
                "file": p.name, "sha256": p.sha256}

    def inputs(self, ctx: BuildContext) -> bytes:
        """The sha256 the release records for the embedded file: known before it is fetched
        (step_fetch refuses any other bytes), so the build can be up to date."""
        spec = spec_of(ctx.image)
        if spec is None or ctx.release is None:
            return b""
        return _disk_file(ctx.root, ctx.image, spec, ctx.release)[1].sha256.encode()


FEATURE = Embedded()
