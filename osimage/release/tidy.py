"""Tidy images/NAME/manifest.json down to the latest clean build (published, when one was).

Every build appends to the image's manifest.json. Before a merge the seed process asks for one
entry per image: the latest build from a clean tree. `tidy` makes that state, `tidy --check`
only reports whether it holds, so CI or a pre-commit hook can enforce it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osimage.config import list_images
from osimage.errors import ConfigError, FactoryError
from osimage.release import image_manifest as manifest


class NotTidy(FactoryError):
    """A manifest.json is not reduced to its latest clean build, or cannot be."""


def is_clean(build: Any) -> bool:
    """A build made from a committed tree: recorded dirty=false and a version without -dirty."""
    if not isinstance(build, dict):
        return False
    data = build.get("custom_data")
    if not isinstance(data, dict):
        return False  # a raw Packer entry: nothing says which tree it came from
    version = data.get("version")
    return (data.get("dirty") is False and isinstance(version, str)
            and not version.endswith("-dirty") and bool(data.get("git_commit")))


def is_published(build: Any) -> bool:
    """Its files went to the mirror. A --no-publish build records published: false; a build
    recorded before that flag existed is taken as published, as it was then."""
    data = build.get("custom_data") if isinstance(build, dict) else None
    if not isinstance(data, dict):
        return False
    if "published" in data:
        return data["published"] is True
    return bool(data.get("mirror_path"))


def latest_clean(builds: Sequence[Any]) -> dict[str, Any] | None:
    """The build to keep and to release: the last clean published build (builds are appended
    in the order they finished); the last clean one only when none of them was published, so
    a --no-publish build never wins over a published one."""
    clean = [b for b in builds if is_clean(b)]
    published = [b for b in clean if is_published(b)]
    chosen = published or clean
    return dict(chosen[-1]) if chosen else None


def build_label(build: dict[str, Any]) -> str:
    data = build.get("custom_data") or {}
    unpublished = "" if is_published(build) else ", not published"
    return f"{data.get('version', '?')} (run {build.get('packer_run_uuid', '?')}{unpublished})"


@dataclass(frozen=True)
class State:
    """One image's manifest.json as read, and what tidying it means."""

    image: str
    data: dict[str, Any]

    @property
    def shown(self) -> str:
        return f"images/{self.image}/manifest.json"

    @property
    def builds(self) -> int:
        return len(self.data["builds"])

    @property
    def keep(self) -> dict[str, Any] | None:
        return latest_clean(self.data["builds"])

    def tidy_data(self) -> dict[str, Any]:
        keep = self.keep
        if keep is None:
            return {**self.data, "builds": [], "last_run_uuid": ""}
        return {**self.data, "builds": [keep], "last_run_uuid": keep.get("packer_run_uuid", "")}

    def problem(self) -> str | None:
        """Why the manifest is not tidy (None when it is)."""
        keep = self.keep
        if self.builds == 0:
            return None
        if keep is None:
            return f"{self.builds} build{'s' if self.builds > 1 else ''}, none clean"
        if self.data == self.tidy_data():
            return None
        if self.builds == 1:
            return "last_run_uuid does not name its build"
        return f"{self.builds} builds, keep 1: {build_label(keep)}"

    def kept(self) -> str:
        keep = self.keep
        return build_label(keep) if keep is not None else "no builds"


def manifest_path(root: Path, image: str) -> Path:
    return root / "images" / image / "manifest.json"


def named_images(root: Path, images: Sequence[str]) -> list[str]:
    """The images named, each checked to be one (images/NAME/image.yaml), without repeats."""
    known = list_images(root)
    for name in images:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"known images: {', '.join(known)}"
            raise ConfigError(f"unknown image '{name}': no images/{name}/image.yaml ({hint})")
    return list(dict.fromkeys(images))


def select(root: Path, images: Sequence[str]) -> list[str]:
    """The images named, else every image with a manifest.json."""
    if images:
        return named_images(root, images)
    return [name for name in list_images(root) if manifest_path(root, name).is_file()]


def _read(root: Path, images: Sequence[str]) -> list[State]:
    return [State(name, manifest.read(manifest_path(root, name)))
            for name in select(root, images)]


def check(root: Path, images: Sequence[str]) -> list[str]:
    """`tidy --check`: one line per tidy image; NotTidy naming every image that is not."""
    states = _read(root, images)
    problems = [f"{s.shown} ({p})" for s in states if (p := s.problem()) is not None]
    if problems:
        first = "" if all(s.keep for s in states if s.builds) else \
            "build each image with no clean build from a committed tree, then "
        raise NotTidy(f"not tidy: {', '.join(problems)}",
                      hint=f"{first}run ./build.py tidy and commit the manifest.json files")
    return [f"{s.shown}: tidy ({s.kept()})" for s in states]


def tidy(root: Path, images: Sequence[str]) -> list[str]:
    """Reduce each manifest.json to its latest clean build; one line per image.

    Every image is checked before any file is written, so a refusal changes nothing.
    """
    states = _read(root, images)
    hopeless = [s.shown for s in states if s.builds and s.keep is None]
    if hopeless:
        raise NotTidy(f"no clean build to keep in {', '.join(hopeless)}",
                      hint="build from a clean tree (commit first), then tidy")
    lines = []
    for state in states:
        if state.problem() is None:
            lines.append(f"{state.shown}: already tidy ({state.kept()})")
            continue
        seen: list[State] = []

        def reduce(data: dict[str, Any], image: str = state.image,
                   seen: list[State] = seen) -> dict[str, Any]:
            # Decided again under the lock: a build may have finished since the first look.
            now = State(image, data)
            if now.builds and now.keep is None:
                raise NotTidy(f"no clean build to keep in {now.shown}")
            seen.append(now)
            return now.tidy_data()

        manifest.update(manifest_path(root, state.image), reduce)
        dropped = seen[0].builds - 1
        lines.append(f"{state.shown}: kept {seen[0].kept()}, dropped {dropped} "
                     f"build{'s' if dropped != 1 else ''}")
    return lines
