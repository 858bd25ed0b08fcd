"""manifests/manifest.yaml: the release model and the file's round trip.

    releases:
      2.4.0:
        patches: {path: repos/Rocky8/..., sha256: ...}   # optional, or null
        images:
          rocky8-base:
            version: 2.4.0
            git_commit: <40 hex digits>
            files:
              - {path: builds/rocky8-base/2.4.0/rocky8-base.qcow2, size: ..., sha256: ...}

An image entry lists files, so the exports of an image (rootfs, oci, squashfs) can join its disk
later. Edits go through ruamel.yaml's round trip, so comments, key order and formatting outside
the edited entry stay byte for byte; they are written atomically under a lock. The commands
that decide what to write (record, set, verify) are in osimage/release.py.
"""

from __future__ import annotations

import difflib
import io
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from osimage import config, manifest
from osimage.errors import ConfigError, FactoryError
from osimage.fsutil import atomic_write_text
from osimage.gitstate import RELEASE

MANIFEST = "manifests/manifest.yaml"
EMPTY = "releases: {}\n"
UNKNOWN_SIZE = -1  # a patch tarball's size is optional


class ReleaseError(FactoryError):
    """A release could not be recorded or does not match the mirror; nothing was written."""


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    kind: str | None = None

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.kind is not None:
            out["kind"] = self.kind
        return out


@dataclass(frozen=True)
class ImageEntry:
    version: str
    git_commit: str
    files: tuple[FileEntry, ...]

    def to_yaml(self) -> dict[str, Any]:
        return {"version": self.version, "git_commit": self.git_commit,
                "files": [f.to_yaml() for f in self.files]}


@dataclass(frozen=True)
class Patches:
    path: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class Release:
    name: str
    images: dict[str, ImageEntry]
    patches: Patches | None = None
    description: str | None = None

    def files(self) -> Iterator[tuple[str, FileEntry]]:
        """(image, file) for every file the release names; the patch tarball as '(patches)'."""
        for image, entry in self.images.items():
            for f in entry.files:
                yield image, f
        if self.patches is not None:
            size = UNKNOWN_SIZE if self.patches.size is None else self.patches.size
            yield "(patches)", FileEntry(self.patches.path, size, self.patches.sha256)


def _image_entry(data: Mapping[str, Any]) -> ImageEntry:
    files = tuple(FileEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]),
                            kind=f.get("kind")) for f in data["files"])
    return ImageEntry(version=str(data["version"]), git_commit=str(data["git_commit"]),
                      files=files)


@dataclass
class ReleaseManifest:
    """The parsed file: the round-trip document (for edits) and its path."""

    path: Path
    doc: Any = field(repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.doc["releases"])

    def get(self, name: str) -> Release:
        releases = self.doc["releases"]
        if name not in releases:
            near = difflib.get_close_matches(name, self.names, n=1, cutoff=0.5)
            hint = (f"did you mean '{near[0]}'?" if near
                    else f"releases: {', '.join(self.names) or 'none yet'}")
            raise ConfigError(f"{MANIFEST}: no release '{name}' ({hint})")
        data = releases[name]
        p = data.get("patches")
        patches = None if p is None else Patches(str(p["path"]), str(p["sha256"]), p.get("size"))
        return Release(name=name, patches=patches, description=data.get("description"),
                       images={str(k): _image_entry(v) for k, v in data["images"].items()})

    def image(self, release: str, image: str) -> ImageEntry:
        """One image's entry (e.g. the rocky8-base disk a usb-installer build starts from)."""
        entry = self.get(release).images.get(image)
        if entry is None:
            raise ConfigError(f"{MANIFEST}: release '{release}' has no image '{image}'")
        return entry


# --- reading and writing the file --------------------------------------------------------------


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, order and quoting survive
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    # 'patches: null' stays null: ruamel writes None as an empty value otherwise
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _parse(text: str) -> Any:
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        doc = _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{MANIFEST}{where}: not valid YAML: {e.problem}") from None
    except YAMLError as e:
        raise ConfigError(f"{MANIFEST}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{MANIFEST}: (top level): must be a mapping with 'releases'")
    _check_keys(doc)
    config.validate(doc, "release", MANIFEST)
    for name, rel in doc["releases"].items():
        for image, entry in rel["images"].items():
            if entry["version"].endswith("-dirty"):
                raise ConfigError(f"{MANIFEST}: releases.{name}.images.{image}.version: "
                                  f"{entry['version']!r} is a -dirty build: never in a release")
    return doc


def _check_keys(doc: Mapping[str, Any]) -> None:
    """Release and image names must be strings: YAML reads an unquoted 2.4 as a number."""
    releases = doc.get("releases")
    if not isinstance(releases, dict):
        return
    for name, rel in releases.items():
        if not isinstance(name, str):
            raise ConfigError(f"{MANIFEST}: releases.{name}: a release name must be a string "
                              f"(write '{name}' in quotes)")
        images = rel.get("images") if isinstance(rel, dict) else None
        for image in images or {}:
            if not isinstance(image, str):
                raise ConfigError(f"{MANIFEST}: releases.{name}.images.{image}: an image name "
                                  f"must be a string")


def load(root: Path) -> ReleaseManifest:
    path = root / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = EMPTY
    except OSError as e:
        raise ConfigError(f"{MANIFEST}: cannot read: {e.strerror}") from None
    return ReleaseManifest(path=path, doc=_parse(text))


def dumps(doc: Any) -> str:
    out = io.StringIO()
    _yaml().dump(doc, out)
    return out.getvalue()


def lock_for(root: Path) -> FileLock:
    """The lock of manifest.yaml. It lives in the git directory: a lock file in manifests/
    would be an untracked file, and an untracked file makes the next build -dirty."""
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--git-path",
                           "osimage-manifest.yaml.lock"], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ConfigError(f"{root}: not inside a git repository")
    lock = Path(proc.stdout.strip())
    return FileLock(str(lock if lock.is_absolute() else root / lock),
                    timeout=manifest.LOCK_TIMEOUT)


def edit(root: Path, change: Callable[[Any], None]) -> str:
    """Re-read, change and atomically rewrite manifest.yaml while holding its lock."""
    lock = lock_for(root)
    try:
        lock.acquire()
    except Timeout:
        raise ReleaseError(f"{MANIFEST}: still locked by another command after "
                           f"{manifest.LOCK_TIMEOUT:.0f} s ({lock.lock_file})") from None
    try:
        current = load(root)
        # Under the lock, a temp file can only be left by a writer that was killed.
        for stale in current.path.parent.glob(f".{current.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        change(current.doc)
        text = dumps(current.doc)
        _parse(text)  # never write a file the next command would refuse to read
        atomic_write_text(current.path, text)
        return text
    finally:
        lock.release()


def _assign(old: Any, new: Any) -> None:
    """Make the round-trip node old equal new in place: kept keys and items keep their
    comments and style (a comment is stored with the node that precedes it)."""
    if isinstance(old, dict):
        for key in [k for k in old if k not in new]:
            del old[key]
        keys: Iterator[Any] = iter(new)
    else:
        del old[len(new):]
        keys = iter(range(len(new)))
    for key in keys:
        value = new[key]
        exists = key in old if isinstance(old, dict) else key < len(old)
        if exists and _same_shape(old[key], value):
            _assign(old[key], value)
        elif not exists and isinstance(old, list):
            old.append(_commented(value))
        elif not exists or old[key] != value:
            old[key] = _commented(value)


def _same_shape(old: Any, new: Any) -> bool:
    return (isinstance(old, dict) and isinstance(new, Mapping)) or \
        (isinstance(old, list) and isinstance(new, list))


def _commented(value: Any) -> Any:
    """Fresh round-trip nodes for plain data (shared ones would be dumped as YAML aliases)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, Mapping):
        return CommentedMap((k, _commented(v)) for k, v in value.items())
    if isinstance(value, list):
        return CommentedSeq(_commented(v) for v in value)
    return value


def check_release_name(name: str) -> None:
    if not RELEASE.match(name):
        raise ConfigError(f"release {name!r} is not a valid release name",
                          hint="letters, digits, '.', '_', '+' and '-', e.g. 2.4.0")
