"""What may be published: never a version a release records, and a build whose publish failed
stays ready for `./build.py publish IMAGE VERSION`.

Before it publishes, a build writes build/IMAGE/VERSION/publish.json: where its files go, each
file's path, size and sha256, and the entry to record in images/IMAGE/manifest.json once they
are on the mirror. If the publish fails or is interrupted, the output is kept with it, so
`./build.py publish IMAGE VERSION` sends the same bytes: a partial upload of them is resumed
and a file already in place is not sent again. A new build of the version replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from osimage import config, runner
from osimage.errors import ConfigError, FactoryError
from osimage.fsutil import atomic_write_text, waiting_lock
from osimage.publish.artifacts import Artifact
from osimage.publish.mirror import open_mirror
from osimage.release import commands as release
from osimage.release import image_manifest as manifest
from osimage.sizes import human
from osimage.ui import Reporter

PENDING = "publish.json"


def check_not_released(root: Path, image: str, version: str) -> None:
    """Refuse a version whose files a release in manifests/manifest.yaml records."""
    doc = release.load(root)
    prefix = f"builds/{image}/{version}/"
    for name in doc.names:
        rel = doc.get(name)
        entry = rel.images.get(image)
        if (entry is not None and entry.version == version) or any(
                f.path.startswith(prefix) for _, f in rel.files()):
            raise ConfigError(f"{release.MANIFEST}: releases.{name}.images.{image}: {image} "
                              f"{version} is recorded in release {name}: its files never change "
                              "(not built nor published again)",
                              hint="build a new version: a new commit, or another --release")


def save(work_dir: Path, dest: str, artifacts: Sequence[Artifact], entry: dict[str, Any]) -> None:
    files = [{"path": str(a.path), "size": a.size, "sha256": a.sha256} for a in artifacts]
    atomic_write_text(work_dir / PENDING, json.dumps({"dest": dest, "files": files,
                                                      "entry": entry}, indent=2) + "\n")


def exists(work_dir: Path) -> bool:
    return (work_dir / PENDING).is_file()


def clear(work_dir: Path) -> None:
    (work_dir / PENDING).unlink(missing_ok=True)


def command(image: str, version: str, replace: bool = False) -> str:
    return f"./build.py publish {image} {version}" + (" --replace" if replace else "")


def kept(e: FactoryError, work_dir: Path, image: str, version: str) -> FactoryError:
    """e, with a hint that tells how to publish the kept build (and nothing it would not do)."""
    from osimage.publish.mirrorlock import PublishLocked, PublishRefused

    if isinstance(e, PublishRefused):
        how = f"`{command(image, version, True)}` replaces them"
    elif isinstance(e, PublishLocked):
        how = (f"if the other publish does not finish, `{command(image, version)}` "
               "publishes this one")
    else:
        how = (f"`{command(image, version)}` publishes it, sending only what the mirror "
               "does not have yet")
    hint = f"the build is kept in {work_dir}: {how}"
    if e.hint:
        hint = f"{e.hint}\n{hint}"
    return type(e)(e.message, hint=hint)


def sent(mirror: object) -> str:
    """What a publish moved, for the terminal: an SSH mirror counts it (TransferStats)."""
    stats = getattr(mirror, "stats", None)
    if stats is None:
        return ""
    return (f" (sent {human(stats.bytes_sent)}, resumed {human(stats.bytes_resumed)}, "
            f"{stats.files_already_there} file(s) already there)")


def publish_kept(root: Path, image: str, version: str, site_file: Path | None, replace: bool,
                 reporter: Reporter, accept_new_host_key: bool = False) -> list[str]:
    """./build.py publish IMAGE VERSION: publish the kept build and record it."""
    site = config.load_site(root, site_file)
    config.load_image(root, image)
    build_dir = Path(site.build_dir)
    work_dir = (build_dir if build_dir.is_absolute() else root / build_dir) / image / version
    path = work_dir / PENDING
    with runner.forwarded_signals():
        with reporter.step("check release"):
            check_not_released(root, image, version)
            try:
                data = json.loads(path.read_text())
                dest = str(data["dest"])
                arts = [Artifact(Path(f["path"]), int(f["size"]), str(f["sha256"]))
                        for f in data["files"]]
                entry: dict[str, Any] = data["entry"]
            except FileNotFoundError:
                raise ConfigError(f"{path}: no build of {image} {version} waits to be published",
                                  hint="only a build whose publish failed is kept for this "
                                       "command; build the image instead") from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
            for a in arts:
                if not a.path.is_file() or a.path.stat().st_size != a.size:
                    raise ConfigError(f"{path}: files: {a.path} is gone or changed since "
                                      "the build", hint="build the image again")
        with waiting_lock(Path(str(work_dir) + ".lock"), lambda: reporter.info(
                f"    waiting for the build of {image} {version} ({work_dir}.lock)")):
            with reporter.step("publish to mirror"):
                mirror = open_mirror(site.mirror_url, root, site.data["mirror"],
                                     accept_new_host_key)
                try:
                    paths = mirror.publish(arts, dest, replace)
                except FactoryError as e:
                    raise kept(e, work_dir, image, version) from None
                reporter.info(f"    {mirror.describe()}: {dest}/{sent(mirror)}")
            with reporter.step("record in manifest.json"):
                # saved before its publish: now it is published, and where
                entry["custom_data"].update(published=True, mirror_path=dest)
                image_manifest = root / "images" / image / "manifest.json"
                manifest.append_build(image_manifest, entry)
                clear(work_dir)
                reporter.info(f"    recorded run {entry.get('packer_run_uuid')} in "
                              f"{image_manifest.relative_to(root)}")
    return paths
