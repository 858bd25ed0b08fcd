"""Incremental builds: an image whose inputs hash equals that of its last clean published build,
whose files are still on the mirror as recorded, is not built again (README.md, "Incremental
builds"). The check reads sizes and the small NAME.sha256 files only: re-hashing gigabytes is
`release verify`'s job, not this one's."""

from __future__ import annotations

import contextlib
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osimage.build import inputs
from osimage.build.context import BuildContext
from osimage.errors import ConfigError
from osimage.features.registry import FEATURES
from osimage.publish.artifacts import parse_checksum_file
from osimage.publish.mirror import LocalMirror
from osimage.release import image_manifest as manifest
from osimage.release.tidy import latest_clean
from osimage.sizes import human


class UpToDate(Exception):  # not an error: the build ends here with exit 0
    """The image is up to date: the message says which build is reused and why."""


REUSED = "up to date"  # ctx.state: the version of the build an up-to-date image reuses


@dataclass(frozen=True)
class Change:
    """One named input whose hash differs from the recorded build's (None: not an input then,
    or not now)."""

    name: str
    old: str | None
    new: str | None

    def __str__(self) -> str:
        return f"{self.name} {_short(self.old)} -> {_short(self.new)}"


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "(none)"


@dataclass(frozen=True)
class Verdict:
    """Whether the image is up to date, and why (or why it builds)."""

    fresh: bool
    why: str  # the up-to-date message, or why it builds
    plan: str  # the same in a few words, for ./build.py plan
    version: str | None = None  # of the recorded build it was compared with
    changes: tuple[Change, ...] = ()
    commit: str | None = None  # of the recorded build whose inputs differ


def early_hash(ctx: BuildContext, dirty_ok: bool = False) -> tuple[inputs.Inputs | None, str]:
    """The inputs before any step ran, or None and why they cannot be known yet (dirty_ok:
    hashed from a dirty tree too, for ./build.py plan)."""
    if ctx.git.dirty and not dirty_ok:
        return None, "a build from a dirty tree is never up to date"
    left_out = sorted({slot for f in FEATURES for slot in f.skips(ctx)})
    if left_out:
        return None, f"this build leaves out {', '.join(left_out)}: it makes no image to reuse"
    used = [f.name for f in FEATURES if f.inputs_from_steps and f.steps(ctx)]
    if used:
        return None, f"its inputs ({', '.join(used)}) are known only once the build fetched them"
    src, _, _ = inputs.source_of(ctx)
    if "prepare" in src:
        target = Path(inputs.resolve_location(ctx.root, src.get("disk") or src["iso"]))
        if not inputs.prepared(ctx.root / src["prepare"], target):
            return None, f"its source is not made yet ({src['prepare']} runs)"
    try:
        return inputs.compute(ctx, inputs.source_checksum(ctx)), ""
    except (ConfigError, OSError) as e:
        return None, f"its inputs cannot be read yet ({e})"


def changes(recorded: Any, now: dict[str, str]) -> tuple[Change, ...] | None:
    """The named inputs whose hash differs from the record's (None: the record has no
    per-input hashes: made by an osimage older than them)."""
    if not isinstance(recorded, dict):
        return None
    names = [*now, *(n for n in recorded if n not in now)]
    return tuple(Change(n, recorded.get(n), now.get(n)) for n in names
                 if recorded.get(n) != now.get(n))


def judge(ctx: BuildContext, dirty_ok: bool = False) -> Verdict:
    """Up to date when the last clean published build has the same inputs hash and its files
    are on the mirror as recorded; otherwise why the image builds."""
    found, why = early_hash(ctx, dirty_ok)
    if found is None:
        return Verdict(False, why, f"builds: {why}")
    builds = manifest.read(ctx.image_manifest)["builds"]
    build = latest_clean(builds)
    if build is None:
        return Verdict(False, f"no clean published build of {ctx.image.name} yet (inputs "
                       f"{found.total[:12]})",
                       "builds: never built" if not builds else "builds: no clean build yet")
    data = build["custom_data"]
    version = str(data["version"])
    label = f"build {version} (commit {str(data.get('git_commit'))[:7]}, " + time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(int(build.get("build_time") or 0))) + ")"
    if data.get("inputs_sha256") != found.total:
        diff = changes(data.get(inputs.STATE_KEY), found.parts)
        which = ("its record has no per-input hashes" if diff is None
                 else ", ".join(map(str, diff)) or "no named input")
        return Verdict(False, f"the inputs changed since {label}: inputs hash "
                       f"{str(data.get('inputs_sha256'))[:12]} then, {found.total[:12]} now "
                       f"(changed: {which})",
                       f"builds: changed since build {version}: {which}", version, diff or (),
                       str(data.get("git_commit") or "") or None)
    if data.get("published") is not True:
        return Verdict(False, f"{label} has the same inputs but is not published",
                       f"builds: build {version} has the same inputs but is not published",
                       version)
    on_mirror = _on_mirror(ctx, build)
    if isinstance(on_mirror, str):
        return Verdict(False, f"{label} has the same inputs, but {on_mirror}",
                       f"builds: build {version} has the same inputs, but {on_mirror}", version)
    return Verdict(True, f"{ctx.image.name} is up to date: reused {label}, because its inputs "
                   f"hash {found.total[:12]} is the same and its files are on the mirror with "
                   f"their recorded size and .sha256 ({', '.join(on_mirror)} in "
                   f"{data['mirror_path']}); --rebuild builds anyway",
                   f"up to date (build {version})", version)


def _on_mirror(ctx: BuildContext, build: dict[str, Any]) -> list[str] | str:
    """What was checked of the build's files on the mirror, or the first thing that differs."""
    data = build["custom_data"]
    dest = str(data.get("mirror_path") or "")
    files = [(str(f["name"]), int(f["size"])) for f in build.get("files") or []]
    digests = data.get("sha256") or {}
    if not dest or not files:
        return "its record names no files on the mirror"
    mirror = ctx.mirror()
    if isinstance(mirror, LocalMirror):
        root = mirror.root
        return _compare(dest, files, digests, lambda p: (root / p).stat().st_size,
                        lambda p: (root / p).read_text(errors="replace"))
    from osimage.publish.sshmirror import SSHMirror  # paramiko loads only for an SSH mirror

    if not isinstance(mirror, SSHMirror):
        return f"{mirror.describe()} cannot be checked"
    top = mirror.location.root
    with mirror.connect() as sftp:  # one session: stat and the small .sha256 files
        def stat(path: str) -> int:
            return int(sftp.stat(posixpath.join(top, path)).st_size or 0)

        def read(path: str) -> str:
            with sftp.open(posixpath.join(top, path)) as f:
                return bytes(f.read(4096)).decode(errors="replace")

        return _compare(dest, files, digests, stat, read)


def _compare(dest: str, files: list[tuple[str, int]], digests: dict[str, str],
             stat: Any, read: Any) -> list[str] | str:
    seen = []
    for name, size in files:
        path = f"{dest}/{Path(name).name}"
        try:
            got = stat(path)
        except OSError:
            return f"{path} is not on the mirror"
        if got != size:
            return f"{path} is {got} bytes on the mirror, {size} recorded"
        try:
            text = read(path + ".sha256")
        except OSError:
            return f"{path}.sha256 is not on the mirror"
        if parse_checksum_file(text, Path(name).name) != digests.get(name):
            return f"{path}.sha256 on the mirror does not name the recorded sha256"
        seen.append(f"{Path(name).name} ({human(size)})")
    return seen


def step_up_to_date(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """Ends the build (UpToDate) when judge() finds the image up to date; otherwise says why
    it builds."""
    if ctx.rebuild:
        ctx.reporter.info("    --rebuild: built whatever the last build was")
        return
    verdict = judge(ctx)
    if not verdict.fresh:
        ctx.reporter.info(f"    builds: {verdict.why}")
        return
    ctx.state[REUSED] = verdict.version
    raise UpToDate(verdict.why)
