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
that decide what to write (record, set, verify) are in osimage/release/commands.py.
"""

from __future__ import annotations

import difflib
import io
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osimage import config
from osimage.build.gitstate import RELEASE
from osimage.errors import ConfigError, FactoryError
from osimage.fsutil import atomic_write_text, waiting_lock
from osimage.release import image_manifest as manifest
from osimage.runner import child_env

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
    s3: str | None = None  # the object's URL, for a file also in the site's S3 bucket

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.kind is not None:
            out["kind"] = self.kind
        if self.s3 is not None:
            out["s3"] = self.s3
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
                            kind=f.get("kind"), s3=f.get("s3")) for f in data["files"])
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
    from ruamel.yaml.error import YAMLError

    try:
        doc = _yaml().load(text)
    except YAMLError as e:
        raise config.yaml_error(MANIFEST, e) from None
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


def lock_for(root: Path) -> Path:
    """The lock of manifest.yaml. It lives in the git directory: a lock file in manifests/
    would be an untracked file, and an untracked file makes the next build -dirty."""
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--git-path",
                           "osimage-manifest.yaml.lock"], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL, env=child_env())
    if proc.returncode != 0:
        raise ConfigError(f"{root}: not inside a git repository")
    lock = Path(proc.stdout.strip())
    return lock if lock.is_absolute() else root / lock


def edit(root: Path, change: Callable[[Any], None]) -> str:
    """Re-read, change and atomically rewrite manifest.yaml while holding its lock."""
    with waiting_lock(lock_for(root), timeout=manifest.LOCK_TIMEOUT, what=MANIFEST):
        current = load(root)
        # Under the lock, a temp file can only be left by a writer that was killed.
        for stale in current.path.parent.glob(f".{current.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        change(current.doc)
        text = dumps(current.doc)
        _parse(text)  # never write a file the next command would refuse to read
        atomic_write_text(current.path, text)
        return text


def put(container: Any, key: Any, value: Any) -> None:
    """container[key] = value (plain data) in place, every comment staying where it was:
    kept keys and items keep theirs, and the comments after the container (above the next
    release, or at the end of the file) stay after it however it grows or shrinks."""
    if key in container and _same_shape(container[key], value):
        _assign(container[key], value)
        return
    tail = _detach_tail(container)
    _set(container, key, value)
    _attach_tail(container, tail)


def _assign(old: Any, new: Any) -> None:
    """Make the round-trip node old equal new in place (see put)."""
    tail = _detach_tail(old)
    if isinstance(old, dict):
        for key in [k for k in old if k not in new]:
            _drop(old, key)
        keys: Iterator[Any] = iter(new)
    else:
        while len(old) > len(new):
            _drop(old, len(old) - 1)
        keys = iter(range(len(new)))
    for key in keys:
        value = new[key]
        exists = key in old if isinstance(old, dict) else key < len(old)
        if exists and _same_shape(old[key], value):
            _assign(old[key], value)
        elif not exists and isinstance(old, list):
            old.append(_like(old[-1] if old else None, _commented(value)))
        elif not exists or old[key] != value:
            _set(old, key, value)
    _attach_tail(old, tail)


def _like(sibling: Any, item: Any) -> Any:
    """A new list item written as its sibling is: a file as {path: ..., size: ..., ...}."""
    flow = getattr(getattr(sibling, "fa", None), "flow_style", lambda: None)()
    if flow and hasattr(item, "fa"):
        item.fa.set_flow_style()
    return item


def _has(container: Any, key: Any) -> bool:
    return key in container if isinstance(container, dict) else 0 <= key < len(container)


def _set(container: Any, key: Any, value: Any) -> None:
    """Replace or add one item; the comments that followed a replaced item follow the new."""
    after: list[Any] = []
    if _has(container, key):
        after = _detach_tail(container[key]) + _detach_slot(container, key)
        container[key] = _commented(value)
    elif isinstance(container, list):
        container.append(_commented(value))
    else:
        container[key] = _commented(value)
    _attach_after(container, key, after)


def _drop(container: Any, key: Any) -> None:
    """Delete one item; the comments after it (above the next item) move up, not away."""
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    at = keys.index(key)
    after = _detach_tail(container[key]) + _detach_slot(container, key)
    del container[key]
    comments: Any = container.ca
    comments.items.pop(key, None)
    if at > 0:
        _attach_after(container, keys[at - 1], after)
    elif after and len(container):
        # now first: its comments go above the next key
        slot = comments.items.setdefault(keys[1], [None, None, None, None])
        slot[1] = [*after, *(slot[1] or [])]


# --- where ruamel keeps comments ---------------------------------------------------------------
# The blank lines and full-line comments after a node are stored with the last scalar inside it
# (a map's ca.items[key][2], a list's ca.items[index][0], the text after that scalar's line
# break), or in the ca.end of its innermost collection. They belong to what follows: the next
# release, or the end of the file. They are taken out before a change and put back at the end
# of the changed node, as lines in ca.end of its innermost block collection.


def _post(container: Any) -> int:
    return 2 if isinstance(container, dict) else 0


def _last(container: Any) -> Any:
    return next(reversed(container)) if isinstance(container, dict) else len(container) - 1


def _detach_slot(container: Any, key: Any) -> list[Any]:
    """The full lines after the scalar at key; its end-of-line comment stays."""
    slot = container.ca.items.get(key)
    pos = _post(container)
    if not slot or len(slot) <= pos or slot[pos] is None:
        return []
    value = slot[pos].value
    if value.lstrip(" ").startswith("#"):  # "# end-of-line comment\n" + the lines after
        cut = value.find("\n") + 1
        if not cut:
            return []
        slot[pos].value = value[:cut]
    else:  # "\n" (the scalar's own line break) + the lines after
        cut = 1 if value.startswith("\n") else 0
        slot[pos] = None
    return [_line(line) for line in value[cut:].splitlines(keepends=True)]


def _line(line: str) -> Any:
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    text = line.lstrip(" ")
    if not text.strip():
        return CommentToken("\n", CommentMark(0))
    return CommentToken(text.rstrip("\n") + "\n", CommentMark(len(line) - len(text)))


def _detach_tail(node: Any) -> list[Any]:
    """Take the lines after node's last line out of node (they are returned in order)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    levels: list[list[Any]] = []
    while isinstance(node, (CommentedMap, CommentedSeq)):
        found = _detach_slot(node, _last(node)) if len(node) else []
        found += list(node.ca.end or [])
        node.ca.end = []
        levels.append(found)
        if not len(node):
            break
        node = node[_last(node)]
    return [token for level in reversed(levels) for token in level]


def _attach_tail(node: Any, tokens: list[Any]) -> None:
    """Put lines after node's last line: in ca.end of its innermost block collection."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if not tokens:
        return
    while len(node):
        child = node[_last(node)]
        if not isinstance(child, (CommentedMap, CommentedSeq)) or not len(child) or \
                child.fa.flow_style():
            break
        node = child
    if node.ca.comment is None:
        node.ca.comment = [None, None]  # ruamel emits ca.end only next to a ca.comment
    node.ca.end = [*(node.ca.end or []), *tokens]


def _attach_after(container: Any, key: Any, tokens: list[Any]) -> None:
    """Put lines right after the item at key (which may be a scalar or a flow collection)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    if not tokens:
        return
    if key == _last(container):
        _attach_tail(container, tokens)
        return
    item = container[key]
    if isinstance(item, (CommentedMap, CommentedSeq)) and len(item) and not item.fa.flow_style():
        _attach_tail(item, tokens)
        return
    text = "".join(" " * t.start_mark.column + t.value if t.value.strip() else "\n"
                   for t in tokens)
    pos = _post(container)
    slot = container.ca.items.setdefault(key, [None] * (pos + 2))
    old = slot[pos]
    if old is not None and old.value.startswith("#"):
        old.value = old.value.rstrip("\n") + "\n" + text
    else:
        slot[pos] = CommentToken("\n" + text, CommentMark(0))


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
