"""mirror.url: parsed and checked once, for the site file and for open_mirror (no paramiko
here: the site file is checked without it)."""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from osimage.errors import ConfigError

SCHEMES = ("file", "ssh")
SSH_FORM = "ssh://USER@HOST[:PORT]/ROOT"


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
