"""./build.py release record|set|verify|show|diff: which build of each image makes up a release.

The file's model and its comment-keeping round trip are in osimage/release/manifest.py (its
names are re-exported here). Nothing enters the file unless every file it names is on the
mirror with the recorded size and sha256.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from osimage import config, netreason
from osimage.build.gitstate import RELEASE
from osimage.errors import EXIT_USAGE, ConfigError
from osimage.publish.artifacts import CHUNK, ThreadedHasher
from osimage.publish.mirror import LocalMirror, Measured
from osimage.release import image_manifest as manifest
from osimage.release.manifest import (
    EMPTY,
    MANIFEST,
    UNKNOWN_SIZE,
    FileEntry,
    ImageEntry,
    Patches,
    Release,
    ReleaseError,
    ReleaseManifest,
    _assign,
    _commented,
    check_release_name,
    dumps,
    edit,
    load,
    lock_for,
    put,
)
from osimage.release.tidy import (
    is_clean,
    is_published,
    latest_clean,
    manifest_path,
    named_images,
)
from osimage.runner import child_env
from osimage.sizes import human
from osimage.ui import table

SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
HTTP_TIMEOUT = (10.0, 60.0)  # connect, between two reads

__all__ = [
    "EMPTY", "MANIFEST", "UNKNOWN_SIZE", "FileEntry", "ImageEntry", "Patches", "Release",
    "ReleaseError", "ReleaseManifest", "_assign", "_commented", "check_release_name", "dumps",
    "edit", "entry_by_hand", "entry_from_build", "load", "lock_for", "open_reader", "put",
    "record",
    "set_image", "verify",
]


# --- the mirror --------------------------------------------------------------------------------


class MirrorReader(Protocol):
    def describe(self) -> str: ...

    def measure(self, path: str, size: int | None = None) -> Measured:
        """Size and sha256 of path on the mirror; the body is skipped when its length is not
        the expected size."""
        ...


@dataclass
class HttpMirror:
    base: str
    _session: Any = field(default=None, repr=False)

    def describe(self) -> str:
        return f"mirror {self.base}"

    def url(self, path: str) -> str:
        return f"{self.base.rstrip('/')}/{quote(path)}"

    def measure(self, path: str, size: int | None = None) -> Measured:
        import requests
        import urllib3

        if self._session is None:
            self._session = requests.Session()
        url = self.url(path)
        try:
            with self._session.get(url, stream=True, timeout=HTTP_TIMEOUT) as r:
                if r.status_code == 404:
                    return Measured(problem="missing on the mirror")
                if r.status_code != 200:
                    return Measured(problem=netreason.http_status(r.status_code, r.reason))
                length = r.headers.get("Content-Length", "")
                if size not in (None, UNKNOWN_SIZE) and length.isdigit() and int(length) != size:
                    return Measured(size=int(length))
                hasher = ThreadedHasher()
                try:
                    # the bytes as stored: never undo a Content-Encoding before hashing
                    for block in r.raw.stream(CHUNK, decode_content=False):
                        hasher.update(block)
                finally:
                    digest = hasher.hexdigest()
                return Measured(size=hasher.size, sha256=digest)
        except requests.ConnectionError as e:
            raise ReleaseError(f"{self.describe()}: cannot connect to get {path}: "
                               f"{netreason.reason(e)}") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise ReleaseError(f"{self.describe()}: reading {path} failed: "
                               f"{netreason.reason(e)}") from None


def read_small(reader: MirrorReader, path: str, limit: int) -> bytes | None:
    """A small file from the mirror (its first `limit` bytes), or None when it is not there."""
    if isinstance(reader, LocalMirror):
        try:
            with (reader.root / path).open("rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ReleaseError(f"{reader.describe()}: cannot read {path}: {e.strerror}") from None
    assert isinstance(reader, HttpMirror)
    import requests

    try:
        r = requests.get(reader.url(path), timeout=HTTP_TIMEOUT)
    except requests.RequestException as e:
        raise ReleaseError(f"{reader.describe()}: cannot get {path}: "
                           f"{netreason.reason(e)}") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise ReleaseError(f"{reader.describe()}: {path}: "
                           f"{netreason.http_status(r.status_code, r.reason)}")
    return r.content[:limit]


def open_reader(root: Path, site_file: Path | None, mirror_url: str | None) -> MirrorReader:
    """--mirror-url, else the site's mirror.http, else its local mirror folder."""
    url = mirror_url
    if url is None:
        site = config.load_site(root, site_file)
        url = site.data["mirror"].get("http") or site.mirror_url
        if "://" in url and not url.startswith(("http://", "https://", "file://")):
            raise ConfigError(f"mirror.url {url!r} cannot be read for verification",
                              hint="set mirror.http in the site file, or pass --mirror-url")
    if url.startswith(("http://", "https://")):
        return HttpMirror(url)
    path = Path(url.removeprefix("file://"))
    return LocalMirror(path if path.is_absolute() else root / path)


def _require_on_mirror(image: str, entry: ImageEntry, reader: MirrorReader,
                       say: Callable[[str], None]) -> None:
    bad = []
    for f in entry.files:
        got = reader.measure(f.path, f.size)
        problem = got.mismatch(f)
        if problem is not None:
            bad.append(f"{f.path}: {problem}")
        else:
            say(f"    {image}: {f.path} matches {reader.describe()} ({f.size} bytes)")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ReleaseError(f"{image}: {bad[0]}{more}; not recorded",
                           hint="\n".join(bad[1:]) or "publish the build again, or rebuild it")


# --- record and set ----------------------------------------------------------------------------


class NoBuildToRecord(ReleaseError):
    """An image has no clean published build: `release record` without names skips it."""

    def __init__(self, message: str, why: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.why = why


def _entry_from_build(root: Path, image: str, version: str | None) -> ImageEntry:
    path = manifest_path(root, image)
    shown = f"images/{image}/manifest.json"
    builds = manifest.read(path)["builds"]
    if version is None:
        build = latest_clean(builds)
        if build is None:
            n = len(builds)
            what = f"{n} build{'s' if n > 1 else ''}, none clean" if n else "no builds"
            raise NoBuildToRecord(f"{shown}: no clean build of {image} to record ({what})",
                                  what, hint=f"commit, then ./build.py {image} --release X")
    else:
        same = [b for b in builds if (b.get("custom_data") or {}).get("version") == version]
        if not same:
            known = [str((b.get("custom_data") or {}).get("version")) for b in builds]
            raise ConfigError(f"{shown}: no build of {image} with version {version!r} "
                              f"(versions: {', '.join(dict.fromkeys(known)) or 'none'})")
        # the same version built again with --no-publish leaves the published one on the mirror
        build = ([b for b in same if is_published(b)] or same)[-1]
        if not is_clean(build):
            raise ReleaseError(f"{shown}: build {version} of {image} is from a dirty tree "
                               f"(-dirty); a release takes clean builds only")
    if not is_published(build):
        which = build["custom_data"]["version"]
        what = f"build {which} was made with --no-publish"
        raise NoBuildToRecord(f"{shown}: no published build of {image} to record ({what}; "
                              f"none of its clean builds is on the mirror)", what,
                              hint=f"./build.py {image} --release X (without --no-publish)")
    data = build["custom_data"]
    files = []
    for f in build.get("files") or []:
        name = str(f.get("name", ""))
        digest = (data.get("sha256") or {}).get(name)
        if not digest or not data.get("mirror_path") or "size" not in f:
            raise ReleaseError(f"{shown}: build {data['version']} of {image} does not record "
                               f"the size, sha256 and mirror_path of {name or 'its files'}")
        in_s3 = ((data.get("exports") or {}).get("s3") or {}).get(name)
        files.append(FileEntry(path=f"{data['mirror_path']}/{Path(name).name}",
                               size=int(f["size"]), sha256=str(digest), kind=f.get("kind"),
                               s3=in_s3))
    if not files:
        raise ReleaseError(f"{shown}: build {data['version']} of {image} has no files")
    return ImageEntry(version=str(data["version"]), git_commit=str(data["git_commit"]),
                      files=tuple(files))


def _select_images(root: Path, images: Sequence[str]) -> list[str]:
    chosen = named_images(root, images) or config.list_images(root)
    if not chosen:
        raise ConfigError("no images to record: images/ holds no image.yaml")
    return chosen


def record(root: Path, name: str, images: Sequence[str], force: bool, reader: MirrorReader,
           say: Callable[[str], None]) -> Release:
    """Make release name from the latest clean published build of each image named. Without
    names: of every image that has one; the others are named as skipped, and only a release
    with no image at all is refused."""
    check_release_name(name)
    chosen = _select_images(root, images)
    _refuse_existing(load(root).doc, name, None, force)
    entries: dict[str, ImageEntry] = {}
    skipped: list[str] = []
    for image in chosen:
        try:
            entries[image] = _entry_from_build(root, image, None)
        except NoBuildToRecord as e:
            if images:
                raise
            skipped.append(f"{image} ({e.why})")
    if skipped:
        say(f"    skipped, no clean published build: {', '.join(skipped)}")
    if not entries:
        raise ReleaseError(f"release {name}: no image has a clean published build to record "
                           f"({', '.join(skipped)})",
                           hint="commit, then ./build.py IMAGE --release X; nothing was written")
    for image, entry in entries.items():
        _require_on_mirror(image, entry, reader, say)

    def change(doc: Any) -> None:
        _refuse_existing(doc, name, None, force)
        releases = doc["releases"]
        new = {image: e.to_yaml() for image, e in entries.items()}
        if name in releases:
            put(releases[name], "images", new)  # keeps its patches and comments
        else:
            put(releases, name, {"images": new})

    edit(root, change)
    return load(root).get(name)


def set_image(root: Path, name: str, image: str, entry: ImageEntry, force: bool,
              reader: MirrorReader, say: Callable[[str], None]) -> Release:
    """Set one image's entry of a release (made if new), once the mirror has its files."""
    check_release_name(name)
    _refuse_existing(load(root).doc, name, image, force)
    _require_on_mirror(image, entry, reader, say)

    def change(doc: Any) -> None:
        _refuse_existing(doc, name, image, force)
        releases = doc["releases"]
        if name not in releases:
            put(releases, name, {"images": {}})
        put(releases[name]["images"], image, entry.to_yaml())

    edit(root, change)
    return load(root).get(name)


class SignedRelease(ReleaseError):
    """A signed release's files never change: bad usage, not a failure."""

    exit_code = EXIT_USAGE


def refuse_signed(doc: Any, name: str) -> None:
    """Even with --force: SHA256SUMS on the mirror is signed (osimage/release/sign.py)."""
    signed = doc["releases"].get(name, {}).get("signed") if name in doc["releases"] else None
    if signed is not None:
        raise SignedRelease(f"{MANIFEST}: release {name} is signed (key {signed.get('key')}, "
                            f"{signed.get('date')}); a signed release never changes",
                            hint="record a new release instead")


def _refuse_existing(doc: Any, name: str, image: str | None, force: bool) -> None:
    refuse_signed(doc, name)
    if force or name not in doc["releases"]:
        return
    if image is None:
        raise ReleaseError(f"{MANIFEST}: release {name} is already recorded",
                           hint="pass --force to record it again")
    if image in doc["releases"][name]["images"]:
        raise ReleaseError(f"{MANIFEST}: release {name} already has an entry for {image}",
                           hint="pass --force to replace it")


def entry_from_build(root: Path, image: str, version: str | None) -> ImageEntry:
    """`release set` from images/IMAGE/manifest.json: the build of that version (else the
    latest clean one)."""
    _select_images(root, [image])
    if version is not None and version.endswith("-dirty"):
        raise ReleaseError(f"{image} {version} is a -dirty build; a release takes clean "
                           f"builds only")
    return _entry_from_build(root, image, version)


def entry_by_hand(root: Path, image: str, version: str, commit: str, files: Sequence[str],
                  sha256s: Sequence[str], reader: MirrorReader) -> ImageEntry:
    """`release set --commit C --file F [--sha256 H]`: an entry from what the user states;
    size (and sha256 where not given) are read from the mirror."""
    _select_images(root, [image])
    if not RELEASE.match(version):
        raise ConfigError(f"--version: {version!r} is not a valid version")
    if version.endswith("-dirty"):
        raise ReleaseError(f"{image} {version} is a -dirty build; a release takes clean "
                           f"builds only")
    if not files:
        raise ConfigError("--file: give the files of the entry (a name in "
                          f"builds/{image}/{version}/, or a mirror path)")
    if sha256s and len(sha256s) != len(files):
        raise ConfigError(f"--sha256: give one per --file ({len(files)}), or none")
    full = _resolve_commit(root, commit)
    out = []
    for i, f in enumerate(files):
        path = f if "/" in f else f"builds/{image}/{version}/{f}"
        if not re.match(config.load_schema("release")["$defs"]["mirror_path"]["pattern"], path):
            raise ConfigError(f"--file: {f!r} is not a path on the mirror under builds/ or repos/")
        if "-dirty/" in path:
            raise ReleaseError(f"{path}: a -dirty build; a release takes clean builds only")
        want = sha256s[i].lower() if sha256s else None
        if want is not None and not SHA256.match(want):
            raise ConfigError(f"--sha256: {sha256s[i]!r} is not 64 hex digits")
        got = reader.measure(path)
        if got.problem is not None:
            raise ReleaseError(f"{path}: {got.problem} ({reader.describe()}); not recorded")
        assert got.size is not None and got.sha256 is not None
        if want is not None and got.sha256 != want:
            raise ReleaseError(f"{path}: sha256 {got.sha256[:12]}... on the mirror, "
                               f"{want[:12]}... given; not recorded")
        out.append(FileEntry(path=path, size=got.size, sha256=got.sha256))
    return ImageEntry(version=version, git_commit=full, files=tuple(out))


def _resolve_commit(root: Path, commit: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet",
                           f"{commit}^{{commit}}"], capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, env=child_env())
    if proc.returncode != 0 or not commit:
        raise ConfigError(f"--commit: {commit!r} is not a commit of this repository")
    return proc.stdout.strip()


# --- verify, show, diff ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    image: str
    file: FileEntry
    problem: str | None


def verify(release: Release, reader: MirrorReader) -> list[Row]:
    """Each file on the mirror; a file also in S3 (osimage/publish/s3.py) there too."""
    rows = []
    for image, f in release.files():
        rows.append(Row(image, f, reader.measure(f.path, f.size).mismatch(f)))
        if f.s3 is not None:
            from osimage.publish import s3

            rows.append(Row(image, replace(f, path=f.s3), s3.measure(f.s3, f.size, f.sha256)))
    return rows


def verify_table(rows: Sequence[Row]) -> str:
    return _table(["IMAGE", "FILE", "SIZE", "SHA256", "STATUS"],
                  [[r.image, r.file.path, _size(r.file.size), r.file.sha256[:12],
                    r.problem or "ok"] for r in rows])


def require_verified(release: Release, rows: Sequence[Row], reader: MirrorReader) -> str:
    bad = [r for r in rows if r.problem is not None]
    if bad:
        names = ", ".join(f"{r.file.path} ({r.problem})" for r in bad)
        raise ReleaseError(f"release {release.name}: {len(bad)} of {len(rows)} files do not "
                           f"match {reader.describe()}: {names}")
    return f"release {release.name}: all {len(rows)} files match {reader.describe()}"


def show_list(m: ReleaseManifest) -> str:
    if not m.names:
        return f"no releases in {MANIFEST} yet"
    rows = []
    for name in m.names:
        rel = m.get(name)
        rows.append([name, ", ".join(f"{i} {e.version}" for i, e in rel.images.items())
                     or "(no images)"])
    return _table(["RELEASE", "IMAGES"], rows)


def show_release(rel: Release) -> str:
    rows = [[image, e.version, e.git_commit[:10], f.path, str(f.size), f.sha256]
            for image, e in rel.images.items() for f in e.files]
    text = _table(["IMAGE", "VERSION", "COMMIT", "FILE", "SIZE", "SHA256"], rows)
    if rel.patches is not None:
        text += f"\npatches: {rel.patches.path} sha256 {rel.patches.sha256}"
    return text


def release_json(rel: Release) -> str:
    return json.dumps(asdict(rel), indent=2)


def diff(a: Release, b: Release) -> list[str]:
    """What changed from release a to release b: '+' added, '-' removed, '~' changed."""
    lines = []
    for image in dict.fromkeys([*a.images, *b.images]):
        old, new = a.images.get(image), b.images.get(image)
        if old is None and new is not None:
            lines.append(f"+ {image}: {_label(new)}")
        elif new is None and old is not None:
            lines.append(f"- {image}: {_label(old)}")
        elif old is not None and new is not None:
            if old == new:
                lines.append(f"  {image}: {_label(new)}")
                continue
            lines.append(f"~ {image}: {_label(old)} -> {_label(new)}")
            lines += _file_changes(old.files, new.files)
    if a.patches != b.patches:
        lines.append(f"~ patches: {_patch_label(a.patches)} -> {_patch_label(b.patches)}")
    return lines


def _file_changes(old: Sequence[FileEntry], new: Sequence[FileEntry]) -> list[str]:
    def by_name(files: Sequence[FileEntry]) -> dict[str, FileEntry]:
        return {Path(f.path).name: f for f in files}

    o, n = by_name(old), by_name(new)
    out = []
    for name in dict.fromkeys([*o, *n]):
        if name not in n:
            out.append(f"    - {o[name].path}")
        elif name not in o:
            out.append(f"    + {n[name].path} ({_size(n[name].size)}, sha256 "
                       f"{n[name].sha256[:12]})")
        elif o[name] != n[name]:
            out.append(f"    ~ {name}: sha256 {o[name].sha256[:12]} -> {n[name].sha256[:12]}, "
                       f"{_size(o[name].size)} -> {_size(n[name].size)}")
    return out


def _label(e: ImageEntry) -> str:
    return f"{e.version} (commit {e.git_commit[:10]})"


def _patch_label(p: Patches | None) -> str:
    return "none" if p is None else f"{p.path} ({p.sha256[:12]})"


def _size(n: int) -> str:
    if n == UNKNOWN_SIZE:
        return "?"
    # exact below 1 MiB: a diff of two small files must show that their sizes differ
    return f"{n} B" if n < 1 << 20 else human(n)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(table(headers, rows))
