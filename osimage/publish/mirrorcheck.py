"""Before the VM starts: can this build publish where the site says?

Each check names what it found and how to fix it, so an hour of build is not lost to a mirror
that could not have taken its artifacts:

- the folder the publish writes into (the deepest existing one of ROOT/builds/IMAGE/VERSION)
  is a folder and is writable: a probe file is really written there, as the publish would;
- it has room for the expected size (the files of the image's last recorded build, else the
  source's size: a fair first guess of the artifact's, which is made from it);
- for an SSH mirror, mirror.http serves that same folder: the probe written over SSH is read
  back over HTTP (as the publish's verification will read the artifacts), then removed.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import shutil
import stat
import tempfile
import urllib.parse
from typing import TYPE_CHECKING, NamedTuple

from osimage import netreason
from osimage.errors import BuildError
from osimage.publish.mirror import LocalMirror, Mirror
from osimage.sizes import human

if TYPE_CHECKING:
    import paramiko

    from osimage.publish.sshmirror import SSHMirror

SLACK = 1 << 20  # what the checksum files and the file system's own blocks take besides
PROBE_PREFIX = "osimage-probe-"  # no leading dot: web servers may refuse dot files
HTTP_TIMEOUT = 20.0
STATVFS_RDONLY = 0x1  # SSH2_FXE_STATVFS_ST_RDONLY


class Expected(NamedTuple):
    """How many bytes the publish will need, and what that guess is based on."""

    size: int
    basis: str


def check(mirror: Mirror, dest: str, expected: Expected | None) -> str:
    """Run the mirror's checks for a publish under dest; what was found, in one line.
    BuildError (one line and a hint) for the first problem."""
    if isinstance(mirror, LocalMirror):
        return _check_local(mirror, dest, expected)
    from osimage.publish.sshmirror import SSHMirror  # paramiko loads only for an SSH mirror

    if isinstance(mirror, SSHMirror):
        return _check_ssh(mirror, dest, expected)
    return f"{mirror.describe()}: nothing to check"


def _room(where: str, dest: str, free: int | None, expected: Expected | None) -> str:
    if free is None:
        return "free space unknown"
    if expected is not None and expected.size + SLACK > free:
        raise BuildError(f"mirror disk full: {dest} needs about {human(expected.size)} "
                         f"({expected.basis}), {where} has {human(free)} free",
                         hint="free space on the mirror, then build again")
    return f"{human(free)} free"


# --- a local folder ----------------------------------------------------------------------------


def _check_local(mirror: LocalMirror, dest: str, expected: Expected | None) -> str:
    folder = mirror.root / dest
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BuildError(f"{mirror.describe()}: {folder} is not a folder",
                         hint="move it away or correct mirror.url in the site file")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BuildError(f"{mirror.describe()}: cannot write to {folder}: "
                         f"{netreason.os_reason(e).lower()}",
                         hint=f"the user building ({_whoami()}) needs write access there"
                         ) from None
    room = _room(str(folder), dest, shutil.disk_usage(folder).free, expected)
    return f"{mirror.describe()}: writable, {room}"


def _whoami() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# --- an SSH mirror with its HTTP side ----------------------------------------------------------


def _check_ssh(mirror: SSHMirror, dest: str, expected: Expected | None) -> str:
    import paramiko

    loc = mirror.location
    with mirror.connect() as sftp:
        try:
            folder = _deepest_remote_folder(mirror, sftp, dest)
            free, read_only = _statvfs(sftp, folder)
            if read_only:
                raise BuildError(f"mirror {loc}: cannot write to {folder}: read-only file "
                                 "system", hint="the mirror's disk must be mounted read-write")
            room = _room(f"{loc.host}:{folder}", dest, free, expected)
            token = secrets.token_hex(16)
            probe = posixpath.join(folder, f"{PROBE_PREFIX}{token[:12]}.txt")
            try:
                _write_probe(mirror, sftp, probe, folder, token)
                _read_probe_over_http(mirror, probe, token)
            finally:
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    sftp.remove(probe)
        except (EOFError, paramiko.SSHException, ConnectionError) as e:
            raise BuildError(f"mirror {loc}: connection lost while checking the mirror: "
                             f"{e or type(e).__name__}") from None
    return f"{mirror.describe()}: writable by {loc.user}, {room}, served by {mirror.http_base}"


def _deepest_remote_folder(mirror: SSHMirror, sftp: paramiko.SFTPClient, dest: str) -> str:
    """The deepest folder of ROOT/dest that exists: where the publish first writes."""
    loc = mirror.location
    try:
        mode = sftp.stat(loc.root).st_mode or 0
    except FileNotFoundError:
        raise BuildError(f"mirror {loc}: the mirror root {loc.root} does not exist there",
                         hint="check mirror.url in the site file") from None
    if not stat.S_ISDIR(mode):
        raise BuildError(f"mirror {loc}: the mirror root {loc.root} is not a folder there",
                         hint="check mirror.url in the site file")
    folder = loc.root
    for part in dest.split("/"):
        path = posixpath.join(folder, part)
        try:
            mode = sftp.stat(path).st_mode or 0
        except FileNotFoundError:
            break
        if not stat.S_ISDIR(mode):
            raise BuildError(f"mirror {loc}: {path} is not a folder",
                             hint="move it away on the mirror")
        folder = path
    return folder


def _statvfs(sftp: paramiko.SFTPClient, path: str) -> tuple[int | None, bool]:
    """Free bytes where path lives and whether it is mounted read-only (OpenSSH's
    statvfs@openssh.com); (None, False) when the server does not tell."""
    import paramiko
    from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

    from osimage.publish.sshpublish import _Wire

    try:
        kind, msg = _Wire(sftp).request(CMD_EXTENDED, "statvfs@openssh.com", path)
    except (OSError, EOFError, paramiko.SSHException):
        return None, False
    if kind != CMD_EXTENDED_REPLY or msg is None:
        return None, False
    # bsize frsize blocks bfree bavail files ffree favail fsid flag namemax
    fields = [msg.get_int64() for _ in range(11)]
    return fields[1] * fields[4], bool(fields[9] & STATVFS_RDONLY)


def _write_probe(mirror: SSHMirror, sftp: paramiko.SFTPClient, probe: str, folder: str,
                 token: str) -> None:
    loc = mirror.location
    try:
        with sftp.open(probe, "w") as f:
            f.chmod(0o644)
            f.write(token.encode())
    except OSError as e:
        # OpenSSH's sftp-server answers EROFS and the like with a bare "Failure"
        reason = netreason.os_reason(e)
        raise BuildError(f"mirror {loc}: cannot write to {folder}: {reason.lower()}",
                         hint=f"{loc.user} needs write access to {folder} on the mirror (and "
                              "a file system mounted read-write)") from None


def _read_probe_over_http(mirror: SSHMirror, probe: str, token: str) -> None:
    import requests

    rel = posixpath.relpath(probe, mirror.location.root)
    url = f"{mirror.http_base}/{urllib.parse.quote(rel)}"
    hint = (f"mirror.http must be the URL of the mirror root {mirror.location.root} on "
            f"{mirror.location.host}")
    try:
        with requests.get(url, timeout=(HTTP_TIMEOUT, HTTP_TIMEOUT),
                          headers={"Cache-Control": "no-cache"}) as r:
            status, reason, body = r.status_code, r.reason, r.content
    except requests.RequestException as e:
        raise BuildError(f"mirror.http {mirror.http_base}: {netreason.reason(e)}",
                         hint="check mirror.http and that the mirror's web server runs"
                         ) from None
    if status == 404:
        raise BuildError(f"mirror.http {mirror.http_base} does not serve the mirror root: a "
                         f"file written over SSH was not found at {url} (404)", hint=hint)
    if status != 200:
        raise BuildError(f"mirror.http {mirror.http_base}: {url}: {status} {reason}", hint=hint)
    if body != token.encode():
        raise BuildError(f"mirror.http {mirror.http_base} does not serve the mirror root: "
                         f"{url} has other content than the file written over SSH", hint=hint)


