"""The mirror: where artifacts are published, laid out as builds/IMAGE/VERSION/FILE.

The embedded default is a local folder (mirror/ at the root) with the production layout.
Files are copied under a temporary name and renamed into place only when all of them are
complete, so no partial file is ever visible under its final name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from osimage.artifacts import Artifact
from osimage.errors import BuildError, ConfigError
from osimage.fsutil import fsync_dir
from osimage.runner import check_interrupted

LAYOUT = ("builds", "repos/Rocky8")
SCHEMES = ("file", "ssh")
SSH_FORM = "ssh://USER@HOST[:PORT]/ROOT"


class Mirror(Protocol):
    def describe(self) -> str: ...

    def publish(self, artifacts: Sequence[Artifact], dest: str) -> list[str]:
        """Publish files under dest (e.g. builds/smoke/1.0); return their mirror paths."""
        ...


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:12]}")


@dataclass
class LocalMirror:
    root: Path

    def describe(self) -> str:
        return f"local mirror {self.root}"

    def ensure_layout(self) -> None:
        for sub in LAYOUT:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def publish(self, artifacts: Sequence[Artifact], dest: str) -> list[str]:
        self.ensure_layout()
        target = self.root / dest
        target.mkdir(parents=True, exist_ok=True)
        sources: list[Path] = []
        for a in artifacts:
            sources += [a.path, a.checksum_path]
        staged: list[tuple[Path, Path]] = []
        try:
            for src in sources:
                check_interrupted()
                final = target / src.name
                tmp = temp_name(final)
                staged.append((tmp, final))
                shutil.copyfile(src, tmp)  # sendfile: the bytes never pass through Python
                with tmp.open("rb+") as f:
                    os.fsync(f.fileno())
                if tmp.stat().st_size != src.stat().st_size:
                    raise BuildError(f"{final}: copy is incomplete")
            check_interrupted()
            for tmp, final in staged:
                os.replace(tmp, final)
            fsync_dir(target)
        except OSError as e:
            raise BuildError(f"{self.describe()}: publishing to {dest} failed: {e.strerror or e}",
                             hint="check the free space and permissions of the mirror") from None
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return [f"{dest}/{src.name}" for src in sources]


def open_mirror(url: str, root: Path, settings: Mapping[str, Any] | None = None) -> Mirror:
    """The mirror a site names: a local folder, or ssh://USER@HOST[:PORT]/ROOT.

    settings is the site's whole mirror object (http, identity_file, known_hosts).
    """
    if url_scheme(url) == "ssh":
        from osimage.sshmirror import SSHMirror  # paramiko loads only for an SSH mirror

        return SSHMirror.from_settings(url, settings or {}, root)
    return LocalMirror(local_path(url, root))


# --- mirror.url: parsed and checked once, for the site file and for open_mirror ----------------


@dataclass(frozen=True)
class SSHLocation:
    user: str
    host: str
    port: int
    root: str

    @classmethod
    def parse(cls, url: str) -> SSHLocation:
        """ssh://USER@HOST[:PORT]/ROOT; ConfigError 'mirror.url: ...' naming what is wrong."""
        shown = f"mirror.url: {url!r}"
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as e:
            raise ConfigError(f"{shown}: not a valid URL ({e}); expected {SSH_FORM}") from None
        if parts.scheme != "ssh":
            raise ConfigError(f"{shown}: expected {SSH_FORM}")
        if not parts.hostname:
            raise ConfigError(f"{shown}: no host name; expected {SSH_FORM}")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            port_text = parts.netloc.rpartition(":")[2]
            raise ConfigError(f"{shown}: the port {port_text!r} is not a number from 1 to "
                              "65535") from None
        if parts.password is not None:
            raise ConfigError("mirror.url: no passwords in the URL: the mirror is reached "
                              "with a key (mirror.identity_file or ssh-agent)")
        if parts.query or parts.fragment:
            raise ConfigError(f"{shown}: no query or fragment allowed")
        if not parts.path.startswith("/"):
            raise ConfigError(f"{shown}: no mirror root folder after the host; expected "
                              f"{SSH_FORM}")
        root = posixpath.normpath(urllib.parse.unquote(parts.path))
        return cls(user=urllib.parse.unquote(parts.username or "root"), host=parts.hostname,
                   port=port or 22, root=root)

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH names this host in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def url_scheme(url: str) -> str:
    """'ssh' or 'file' ('' for a plain folder path); ConfigError for any other scheme."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?", url)
    if match is None or (match[2] is None and len(match[1]) == 1):
        return ""  # a path (a one-letter "scheme" would be a drive letter, not a URL)
    scheme = match[1].lower()
    if match[2] is None and scheme not in SCHEMES:
        return ""  # "name:with-colon" is a folder name
    if scheme not in SCHEMES:
        raise ConfigError(f"mirror.url: unknown scheme {scheme!r} (use a folder path, "
                          "file:// or ssh://)")
    if match[2] is None:
        form = SSH_FORM if scheme == "ssh" else "file:///PATH"
        raise ConfigError(f"mirror.url: {url!r}: expected {form}")
    return scheme


def local_path(url: str, root: Path) -> Path:
    """The folder of a local mirror URL (a path or file://PATH), relative to root."""
    path = Path(url.removeprefix("file://"))
    return path if path.is_absolute() else root / path


def check_url(url: str, root: Path) -> None:
    """What can be known of mirror.url without contacting it: a known scheme, a well-formed
    ssh:// URL, an existing local folder (a typo must not grow a new tree)."""
    scheme = url_scheme(url)
    if scheme == "ssh":
        SSHLocation.parse(url)
        return
    path = local_path(url, root)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"mirror.url: the mirror folder {path} {what}",
                          hint=f"create it (mkdir -p {path}) or correct mirror.url")
