"""The production mirror: upload over SSH (paramiko SFTP), then check each file over HTTP.

The site names it `mirror: {url: ssh://USER@HOST[:PORT]/ROOT, http: http://HOST/...}`; the
HTTP base serves ROOT, so builds/IMAGE/VERSION/FILE is reachable on both sides.

How a publish keeps the mirror consistent:
- every file goes to `.NAME.partial-SHA16` beside its final name (SHA16: the first 16 hex
  digits of the sha256 recorded at build time); it is renamed into place (posix-rename, atomic)
  only after the sha256 of the bytes sent, computed while sending, equals the recorded one and
  the size on the mirror is right. Nothing incomplete is ever visible under a final name.
- the dot-prefixed partial stays when the connection drops or the build is interrupted; the
  next publish of the same bytes resumes it (the local prefix is hashed while skipping it, so
  the file is still read once). Its name carries the expected sha256, so a partial of other
  bytes (a rebuilt -dirty version) is never resumed: it is deleted.
- on "disk full" the partials of this publish are deleted to give the space back.
- a file already in place with the right size and the right bytes over HTTP is not sent again,
  so a second run after a failure completes the job.
- renames happen after every upload succeeded, artifacts before their NAME.sha256 files.

Host keys are checked against known_hosts (OpenSSH format, hashed entries included): an
unknown key is refused unless accept_new_host_key (CLI --accept-new-host-key only, never an
inherited environment variable), which appends it; a changed key is always refused.
Authentication: the site's identity_file, else ssh-agent, else ~/.ssh/id_{ed25519,ecdsa,rsa}.
Nothing secret is logged or passed in argv.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import os
import posixpath
import socket
import stat
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import paramiko
import requests
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_WRITE, int64

from osimage import netreason
from osimage.artifacts import Artifact, ThreadedHasher, parse_checksum_file
from osimage.errors import BuildError, ConfigError, FactoryError
from osimage.mirror import SSHLocation
from osimage.runner import check_interrupted

# aes128-gcm is the fastest cipher paramiko speaks (AES-NI, no separate MAC); the others are
# fallbacks for servers without it.
CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com", "aes256-ctr")
REQUEST_SIZE = 255 * 1024  # OpenSSH's sftp-server takes messages up to 256 KiB
BLOCK = 4 * REQUEST_SIZE  # local reads: whole requests, big enough that hashlib drops the GIL
WRITES_IN_FLIGHT = 32  # unanswered writes; the server's SSH window (2 MiB) limits them anyway
WINDOW = 64 << 20  # ours, for what the server sends (answers only, in an upload)
CONNECT_TIMEOUT = 15.0
IO_TIMEOUT = 120.0  # a mirror silent this long counts as a dropped connection
HTTP_TIMEOUT = 60.0
INTERRUPT_CHECK = 64  # blocks between checks for Ctrl-C
DISK_FULL_SLACK = 4 * REQUEST_SIZE
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
# known_hosts stores RSA keys as ssh-rsa; the handshake names their signature algorithms
KEY_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-")  # OpenSSH's; paramiko knows only some of them

Progress = Callable[[str, int, int], None]


@dataclass
class TransferStats:
    """What the last publish did; bytes_sent counts file bytes, not protocol overhead."""

    bytes_sent: int = 0
    bytes_resumed: int = 0
    files_sent: int = 0
    files_already_there: int = 0
    cipher: str = ""
    upload_seconds: float = 0.0
    verify_seconds: float = 0.0


@dataclass
class _Item:
    """One file to publish: an artifact or its NAME.sha256."""

    name: str
    size: int
    sha256: str
    path: Path | None = None
    data: bytes | None = None
    offset: int = 0
    skip: bool = False
    partial_exists: bool = False

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb", buffering=0)

    @property
    def partial(self) -> str:
        return f".{self.name}.partial-{self.sha256[:16]}"


def fingerprint(key: paramiko.PKey) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` shows it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {fingerprint(key)}"


def verify_http(url: str, size: int, sha256: str, *, timeout: float = HTTP_TIMEOUT) -> None:
    """GET url streamed, hashing as it arrives; BuildError unless size and sha256 match."""
    h = hashlib.sha256()
    got = 0
    headers = {"Accept-Encoding": "identity", "Cache-Control": "no-cache"}
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT, timeout),
                          headers=headers) as r:
            if r.status_code != 200:
                raise BuildError(f"mirror HTTP check: {url}: "
                                 f"{netreason.http_status(r.status_code, r.reason)}",
                                 hint="mirror.http must serve the mirror's root folder")
            for chunk in r.iter_content(BLOCK):
                h.update(chunk)
                got += len(chunk)
    except (requests.RequestException, OSError) as e:
        raise BuildError(f"mirror HTTP check: {url}: {netreason.reason(e)}",
                         hint="check mirror.http and that the mirror's web server runs") from None
    if got != size:
        raise BuildError(f"mirror HTTP check: {url}: served {got} bytes, expected {size}")
    if h.hexdigest() != sha256:
        raise BuildError(f"mirror HTTP check: {url}: sha256 {h.hexdigest()} does not match "
                         f"{sha256}", hint="the web server may serve another folder or a "
                         "stale cache; the SSH upload itself was verified")


# Set by the command line's --accept-new-host-key alone: trusting a new mirror must be the
# user's decision for this run, not something inherited from the environment of a shell or CI.
_trust_new_host_keys = [False]


def trust_new_host_keys(on: bool = True) -> None:
    """--accept-new-host-key: SSH mirrors opened from now on add a host key not yet known."""
    _trust_new_host_keys[0] = on


class SSHMirror:
    """A Mirror (publish(artifacts, dest) -> paths) on a server reached over SSH."""

    def __init__(self, url: str, http_base: str, *, identity_file: Path | None = None,
                 known_hosts: Path | None = None, accept_new_host_key: bool | None = None,
                 check_free_space: bool = True, progress: Progress | None = None) -> None:
        self.location = SSHLocation.parse(url)
        self.http_base = http_base.rstrip("/")
        self.identity_file = identity_file
        self.known_hosts = known_hosts or Path("~/.ssh/known_hosts").expanduser()
        if accept_new_host_key is None:
            accept_new_host_key = _trust_new_host_keys[0]
        self.accept_new_host_key = accept_new_host_key
        self.check_free_space = check_free_space
        self.progress = progress
        self.stats = TransferStats()
        self._phase = "connecting"
        self._renamed = 0

    @classmethod
    def from_settings(cls, url: str, settings: Mapping[str, Any], root: Path) -> SSHMirror:
        """From the site file's mirror object; relative paths are relative to root."""
        http = settings.get("http")
        if not http:
            raise ConfigError("mirror.http: required for an ssh:// mirror (the HTTP URL that "
                              "serves the mirror's root, used to verify each upload)")

        def path(key: str) -> Path | None:
            value = settings.get(key)
            if not value:
                return None
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else root / p

        return cls(url, str(http), identity_file=path("identity_file"),
                   known_hosts=path("known_hosts"))

    def describe(self) -> str:
        return f"SSH mirror {self.location}{self.location.root}"

    # --- connection -------------------------------------------------------------------

    @contextlib.contextmanager
    def connect(self) -> Iterator[paramiko.SFTPClient]:
        """An authenticated SFTP session with a verified host key."""
        loc = self.location
        try:
            sock = socket.create_connection((loc.host, loc.port), timeout=CONNECT_TIMEOUT)
        except socket.gaierror:
            raise BuildError(f"mirror {loc} unreachable: unknown host {loc.host}") from None
        except TimeoutError:
            raise BuildError(f"mirror {loc} unreachable: no answer within "
                             f"{CONNECT_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise BuildError(f"mirror {loc} unreachable: {e.strerror or e}",
                             hint="check that the mirror is up and sshd listens there") from None
        transport = paramiko.Transport(sock, default_window_size=WINDOW)
        try:
            options = transport.get_security_options()
            options.ciphers = CIPHERS
            options.key_types = self._key_types(options.key_types)
            try:
                transport.start_client(timeout=CONNECT_TIMEOUT)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise BuildError(f"mirror {loc}: SSH handshake failed: {_reason(e)}") from None
            self._check_host_key(transport.get_remote_server_key())
            self._authenticate(transport)
            transport.set_keepalive(15)
            self.stats.cipher = str(getattr(transport, "local_cipher", ""))
            try:
                sftp = paramiko.SFTPClient.from_transport(transport, window_size=WINDOW)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise BuildError(f"mirror {loc}: no SFTP service: {_reason(e)}",
                                 hint="the mirror's sshd needs `Subsystem sftp`") from None
            if sftp is None:
                raise BuildError(f"mirror {loc}: no SFTP service")
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(IO_TIMEOUT)
            try:
                yield sftp
            finally:
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    sftp.close()  # on a dropped connection this fails too: the error is known
        finally:
            transport.close()

    def _known_host_keys(self) -> tuple[dict[str, paramiko.PKey], list[bytes]]:
        """Keys known for this host by type, and the keys marked @revoked."""
        hostkeys = paramiko.HostKeys()
        revoked: list[bytes] = []
        for path in (Path("/etc/ssh/ssh_known_hosts"), self.known_hosts):
            if not path.is_file():
                continue
            try:
                text = path.read_text(errors="replace")
            except OSError as e:
                raise BuildError(f"{path}: cannot read known hosts: {_reason(e)}") from None
            for number, line in enumerate(text.splitlines(), 1):
                entry = _known_hosts_line(line, f"{path}:{number}")
                if entry is None:
                    continue
                marker, names, key_type, blob = entry
                if marker == "@revoked":
                    revoked.append(blob)
                elif marker is None:
                    with contextlib.suppress(paramiko.SSHException, ValueError):
                        key = paramiko.PKey.from_type_string(key_type, blob)
                        for name in names:
                            hostkeys.add(name, key_type, key)
        entry_ = hostkeys.lookup(self.location.known_hosts_name)
        known = {name: entry_[name] for name in entry_} if entry_ is not None else {}
        return known, revoked

    def _key_types(self, offered: Sequence[str]) -> list[str]:
        """Ask first for the host key types known_hosts has, as OpenSSH does."""
        known, _ = self._known_host_keys()
        first = [alg for name in known for alg in KEY_ALGORITHMS.get(name, (name,))
                 if alg in offered]
        return first + [alg for alg in offered if alg not in first]

    def _check_host_key(self, key: paramiko.PKey) -> None:
        loc = self.location
        known, revoked = self._known_host_keys()
        if key.asbytes() in revoked:
            raise BuildError(f"mirror {loc}: host key {describe_key(key)} is revoked in "
                             "known_hosts; refusing to connect")
        if key.get_name() in known:
            if known[key.get_name()].asbytes() == key.asbytes():
                return
            raise BuildError(
                f"mirror {loc}: HOST KEY CHANGED: it now presents {describe_key(key)}, "
                f"known_hosts has {describe_key(known[key.get_name()])}; refusing to connect",
                hint=f"if the mirror was reinstalled, check the new fingerprint with its "
                     f"administrator, then remove the old line: ssh-keygen -R "
                     f"'{loc.known_hosts_name}' -f {self.known_hosts}")
        if known:
            raise BuildError(
                f"mirror {loc}: HOST KEY CHANGED: it presents {describe_key(key)}, "
                f"known_hosts only has {', '.join(sorted(known))} keys for it; refusing",
                hint=f"check the fingerprint with the mirror's administrator, then remove the "
                     f"old line: ssh-keygen -R '{loc.known_hosts_name}' -f {self.known_hosts}")
        if not self.accept_new_host_key:
            raise BuildError(
                f"mirror {loc}: unknown host key {describe_key(key)} (not in "
                f"{self.known_hosts})",
                hint="compare the fingerprint with `ssh-keygen -lf "
                     "/etc/ssh/ssh_host_*_key.pub` on the mirror, then run again with "
                     "--accept-new-host-key to add it")
        line = f"{loc.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
        try:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.known_hosts.open("a") as f:
                f.write(line)
        except OSError as e:
            raise BuildError(f"{self.known_hosts}: cannot add the mirror's host key: "
                             f"{_reason(e)}") from None

    def _authenticate(self, transport: paramiko.Transport) -> None:
        loc = self.location
        tried: list[str] = []

        def attempt(key: paramiko.PKey, what: str) -> bool:
            tried.append(what)
            try:
                transport.auth_publickey(loc.user, key)
            except paramiko.BadAuthenticationType as e:
                raise BuildError(f"mirror {loc} refused authentication: it does not accept "
                                 f"keys for {loc.user} (allowed: {', '.join(e.allowed_types)})"
                                 ) from None
            except paramiko.AuthenticationException:
                return False
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise BuildError(f"mirror {loc}: connection lost while authenticating: "
                                 f"{_reason(e)}") from None
            return transport.is_authenticated()

        locked: list[Path] = []  # passphrase-protected key files the agent could not stand in for
        agent_socket = os.environ.get("SSH_AUTH_SOCK")
        try:
            agent: paramiko.Agent | None = paramiko.Agent()
        except (paramiko.SSHException, OSError):
            agent = None  # SSH_AUTH_SOCK names a dead agent: go on with the key files
        try:
            agent_keys = list(agent.get_keys()) if agent is not None else []
            if self.identity_file is not None:
                key = self._load_key(self.identity_file)
                if key is not None:
                    if attempt(key, str(self.identity_file)):
                        return
                else:  # as OpenSSH does: the agent's copy of a protected identity file
                    public = _public_blob(self.identity_file)
                    for agent_key in agent_keys:
                        if public in (None, agent_key.asbytes()) and attempt(
                                agent_key, f"agent key {fingerprint(agent_key)}"):
                            return
                    locked.append(self.identity_file)
            else:
                for agent_key in agent_keys:
                    if attempt(agent_key, f"agent key {fingerprint(agent_key)}"):
                        return
                for name in DEFAULT_KEYS:
                    path = Path("~/.ssh").expanduser() / name
                    if not path.is_file():
                        continue
                    try:
                        default_key = paramiko.PKey.from_path(path)
                    except (paramiko.SSHException, OSError, ValueError, TypeError) as e:
                        if _passphrase_protected(e):
                            locked.append(path)
                        continue  # unreadable or not a key: OpenSSH skips it too
                    if attempt(default_key, str(path)):
                        return
        finally:
            if agent is not None:
                agent.close()
        if locked:
            why = ("no ssh-agent is running (SSH_AUTH_SOCK is not set)" if not agent_socket
                   else "the ssh-agent does not hold it" if agent is not None
                   else f"the ssh-agent at {agent_socket} does not answer")
            raise BuildError(
                f"mirror {loc}: the key {locked[0]} is passphrase-protected and {why}",
                hint=f"start ssh-agent and add the key (eval \"$(ssh-agent)\"; ssh-add "
                     f"{locked[0]}), or set mirror.identity_file to an unencrypted deploy key")
        raise BuildError(f"mirror {loc} refused authentication as {loc.user} "
                         f"(tried: {', '.join(tried) or 'no key found'})",
                         hint=f"add the build host's public key to {loc.user}'s "
                              "authorized_keys on the mirror, or set mirror.identity_file")

    @staticmethod
    def _load_key(path: Path) -> paramiko.PKey | None:
        """The private key in mirror.identity_file; None if it is passphrase-protected."""
        try:
            with path.open("rb") as f:
                head = f.read(64)
        except FileNotFoundError:
            raise BuildError(f"mirror.identity_file {path} does not exist") from None
        except OSError as e:
            raise BuildError(f"mirror.identity_file {path}: cannot read it: {_reason(e)}"
                             ) from None
        if head.startswith((b"ssh-", b"ecdsa-", b"sk-", b"---- BEGIN SSH2 PUBLIC KEY")):
            private = path.with_suffix("") if path.suffix == ".pub" else None
            raise BuildError(f"mirror.identity_file {path} is a public key; it must name the "
                             "private key" + (f" ({private})" if private else ""),
                             hint="the public half goes into authorized_keys on the mirror")
        try:
            return paramiko.PKey.from_path(path)
        except (paramiko.SSHException, OSError, ValueError, TypeError) as e:
            if _passphrase_protected(e):
                return None
            raise BuildError(f"mirror.identity_file {path}: not a usable private key: "
                             f"{_reason(e).split('. See ')[0]}") from None

    # --- publishing ---------------------------------------------------------------------

    def publish(self, artifacts: Sequence[Artifact], dest: str) -> list[str]:
        dest = _clean_dest(dest)
        self.stats = TransferStats()
        items: list[_Item] = []
        for a in artifacts:
            items.append(_Item(a.name, a.size, a.sha256, path=a.path))
            data = _checksum_text(a).encode()
            items.append(_Item(a.checksum_path.name, len(data),
                               hashlib.sha256(data).hexdigest(), data=data))
        remote_dir = posixpath.join(self.location.root, dest)
        self._phase = "connecting"
        self._renamed = 0
        with self.connect() as sftp:
            try:
                self._phase = f"creating {remote_dir}"
                self._makedirs(sftp, dest)
                self._plan(sftp, items, remote_dir, dest)
                start = time.monotonic()
                for item in items:
                    if not item.skip:
                        self._upload(sftp, item, remote_dir)
                self.stats.upload_seconds = time.monotonic() - start
                # artifacts before their checksum files: a NAME.sha256 implies its NAME
                for item in items[0::2] + items[1::2]:
                    if not item.skip:
                        self._phase = f"renaming {item.partial} to {item.name}"
                        sftp.posix_rename(posixpath.join(remote_dir, item.partial),
                                          posixpath.join(remote_dir, item.name))
                        self._renamed += 1
            except FactoryError:
                raise
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise self._failure(sftp, e, items, remote_dir) from None
        start = time.monotonic()
        for item in items:
            if not item.skip:
                check_interrupted()
                verify_http(self._http_url(dest, item.name), item.size, item.sha256)
        self.stats.verify_seconds = time.monotonic() - start
        return [f"{dest}/{item.name}" for item in items]

    def _http_url(self, dest: str, name: str) -> str:
        return f"{self.http_base}/{urllib.parse.quote(f'{dest}/{name}')}"

    def _plan(self, sftp: paramiko.SFTPClient, items: list[_Item], remote_dir: str,
              dest: str) -> None:
        """Decide per file: already in place, resume a partial, or send it all."""
        self._phase = f"listing {remote_dir}"
        present = {a.filename: a for a in sftp.listdir_attr(remote_dir)}
        ours = {item.partial for item in items}
        for item in items:
            stale = [n for n in present if n.startswith(f".{item.name}.partial-")
                     and n not in ours]
            for name in stale:  # a partial of other bytes: never resumable
                self._phase = f"removing the stale {name}"
                sftp.remove(posixpath.join(remote_dir, name))
                del present[name]
            final = present.get(item.name)
            # an artifact already in place is checked over HTTP rather than sent again;
            # checksum files are tiny and always sent
            if final is not None and final.st_size == item.size and item.path is not None:
                try:
                    verify_http(self._http_url(dest, item.name), item.size, item.sha256)
                    item.skip = True
                    self.stats.files_already_there += 1
                    continue
                except BuildError:
                    pass  # not the right bytes (or not served): send it again
            partial = present.get(item.partial)
            have = partial.st_size or 0 if partial is not None else 0
            item.partial_exists = partial is not None
            if item.data is None and 0 < have <= item.size:
                # resend the last MiB: a torn tail of the previous attempt is overwritten
                item.offset = max(0, (have // BLOCK) * BLOCK - BLOCK)
        if self.check_free_space:
            needed = sum(item.size - item.offset for item in items if not item.skip)
            free = self._free_bytes(sftp, remote_dir)
            if free is not None and needed + DISK_FULL_SLACK > free:
                raise BuildError(f"mirror disk full: {dest} needs {_mib(needed)}, "
                                 f"{self.location.host}:{remote_dir} has {_mib(free)} free",
                                 hint="free space on the mirror, then run again")

    def _upload(self, sftp: paramiko.SFTPClient, item: _Item, remote_dir: str) -> None:
        """Send item to its partial name, hashing the bytes as they are read."""
        target = posixpath.join(remote_dir, item.partial)
        self._phase = f"uploading {item.name}"
        hasher = ThreadedHasher()
        done = 0
        try:
            with item.open() as src:
                while done < item.offset:  # the prefix already on the mirror: hash only
                    block = src.read(min(BLOCK, item.offset - done))
                    if not block:
                        break
                    hasher.update(block)
                    done += len(block)
                mode = "r+" if item.offset and done == item.offset else "w"
                self.stats.bytes_resumed += done
                wire = _Wire(sftp)
                with sftp.open(target, mode, bufsize=0) as dst:
                    item.partial_exists = True
                    dst.chmod(0o644)
                    blocks = 0
                    while block := src.read(BLOCK):
                        wire.write(dst.handle, done, block)
                        hasher.update(block)
                        done += len(block)
                        self.stats.bytes_sent += len(block)
                        blocks += 1
                        if blocks % INTERRUPT_CHECK == 0:
                            check_interrupted()
                        if self.progress is not None:
                            self.progress(item.name, done, item.size)
                    wire.finish_writes()
                    wire.fsync(dst.handle)
        finally:
            digest = hasher.hexdigest()
        if digest != item.sha256 or done != item.size:
            with contextlib.suppress(OSError):
                sftp.remove(target)
            raise BuildError(f"{item.name} changed since its checksum was recorded "
                             f"(sha256 now {digest}, recorded {item.sha256}); nothing was "
                             "published", hint="rebuild the image")
        size = sftp.stat(target).st_size
        if size != item.size:
            raise BuildError(f"mirror: {item.name} is {size} bytes on the mirror after "
                             f"upload, expected {item.size}; nothing was published")
        self.stats.files_sent += 1

    def _failure(self, sftp: paramiko.SFTPClient, e: BaseException, items: Sequence[_Item],
                 remote_dir: str) -> BuildError:
        """One clear error for a failed transfer; on disk full, give the space back."""
        loc = self.location
        channel = sftp.get_channel()
        alive = channel is not None and not channel.closed and \
            channel.get_transport().is_active()
        if not alive or isinstance(e, (EOFError, paramiko.SSHException, ConnectionError)):
            return BuildError(f"mirror {loc}: connection lost while {self._phase}; "
                              f"{self._outcome()}",
                              hint="run again: the upload resumes where it stopped")
        if isinstance(e, TimeoutError):
            return BuildError(f"mirror {loc}: no answer for {IO_TIMEOUT:.0f} s while "
                              f"{self._phase}; {self._outcome()}",
                              hint="run again: the upload resumes where it stopped")
        code = e.errno if isinstance(e, OSError) else None
        disk_full = code in (errno.ENOSPC, errno.EDQUOT) or (
            code is None and self._disk_full(sftp, remote_dir))
        # OpenSSH's sftp-server answers a failed write with a bare "Failure"
        write_refused = code is None and self._phase.startswith("uploading")
        if disk_full or write_refused:
            for item in items:
                if item.partial_exists and not item.skip:
                    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                        sftp.remove(posixpath.join(remote_dir, item.partial))
        if disk_full:
            return BuildError(f"mirror disk full while {self._phase} to {loc.host}:"
                              f"{remote_dir}; {self._outcome()}",
                              hint="free space on the mirror, then run again")
        if write_refused:
            return BuildError(f"mirror {loc}: the mirror refused a write while {self._phase} "
                              f"({_reason(e)}: over quota, or a disk error); {self._outcome()}",
                              hint="check the quota and the disk of the mirror, then run again")
        return BuildError(f"mirror {loc}: {self._phase} failed: {_reason(e)}; "
                          f"{self._outcome()}")

    def _outcome(self) -> str:
        if self._renamed:
            return f"only {self._renamed} complete file(s) were put in place"
        return "nothing was published"

    def _disk_full(self, sftp: paramiko.SFTPClient, remote_dir: str) -> bool:
        free = self._free_bytes(sftp, remote_dir)
        return free is not None and free < DISK_FULL_SLACK

    @staticmethod
    def _free_bytes(sftp: paramiko.SFTPClient, path: str) -> int | None:
        """Free bytes where path lives (OpenSSH's statvfs extension), None if unknown."""
        try:
            fields = _Wire(sftp).statvfs(path)
        except (OSError, EOFError, paramiko.SSHException):
            return None
        if fields is None:
            return None
        _bsize, frsize, _blocks, _bfree, bavail = fields
        return frsize * bavail

    def _makedirs(self, sftp: paramiko.SFTPClient, dest: str) -> None:
        """Create ROOT/dest folder by folder; ROOT itself must exist (a typo in mirror.url
        must not grow a new tree on the mirror)."""
        root = self.location.root
        try:
            root_mode = sftp.stat(root).st_mode or 0
        except FileNotFoundError:
            root_mode = 0
        if not stat.S_ISDIR(root_mode):
            raise BuildError(f"mirror {self.location}: the mirror root {root} is not a folder "
                             "there", hint="check mirror.url in the site file")
        current = root
        for part in dest.split("/"):
            current = posixpath.join(current, part)
            try:
                mode = sftp.stat(current).st_mode or 0
            except FileNotFoundError:
                try:
                    sftp.mkdir(current, 0o755)
                    continue
                except OSError as e:
                    try:  # made meanwhile by another publish, or a real error
                        mode = sftp.stat(current).st_mode or 0
                    except FileNotFoundError:
                        raise BuildError(
                            f"mirror {self.location}: cannot create {current}: {_reason(e)}",
                            hint=f"{self.location.user} needs write access to "
                                 f"{posixpath.dirname(current)} on the mirror") from None
            if not stat.S_ISDIR(mode):
                raise BuildError(f"mirror {self.location}: {current} is not a folder")


class _Wire:
    """The private SFTPClient calls this module needs, in one place.

    paramiko has no API for OpenSSH's extensions (statvfs, fsync), and its pipelined
    SFTPFile.write drops the servers' answers to writes unread by their owner: a full disk
    went unnoticed. Here every write's answer is awaited, in order, with a bounded number of
    writes in flight, and a failed one raises.
    """

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self._send = cast(Callable[..., int],
                          getattr(sftp, "_async_request"))  # noqa: B009 (not in the stubs)
        self._read = cast(Callable[[int], tuple[int | None, paramiko.Message | None]],
                          getattr(sftp, "_read_response"))  # noqa: B009 (not in the stubs)
        self._pending: deque[int] = deque()

    def request(self, kind: int, *args: Any) -> tuple[int | None, paramiko.Message | None]:
        """Send a request and wait for its answer; an error status raises OSError."""
        return self._read(self._send(type(None), kind, *args))

    def write(self, handle: object, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), REQUEST_SIZE):
            self._pending.append(self._send(type(None), CMD_WRITE, handle,
                                            int64(offset + start),
                                            view[start:start + REQUEST_SIZE]))
            while len(self._pending) > WRITES_IN_FLIGHT:
                self._read(self._pending.popleft())

    def finish_writes(self) -> None:
        while self._pending:
            self._read(self._pending.popleft())

    def fsync(self, handle: object) -> None:
        """Make a file durable before it is renamed (fsync@openssh.com, if offered)."""
        try:
            self.request(CMD_EXTENDED, "fsync@openssh.com", handle)
        except OSError as e:
            if "unsupported" not in str(e).lower():
                raise

    def statvfs(self, path: str) -> tuple[int, ...] | None:
        """OpenSSH's statvfs: (bsize, frsize, blocks, bfree, bavail, ...), None if unknown."""
        kind, msg = self.request(CMD_EXTENDED, "statvfs@openssh.com", path)
        if kind != CMD_EXTENDED_REPLY or msg is None:
            return None
        return tuple(msg.get_int64() for _ in range(5))


def _passphrase_protected(e: BaseException) -> bool:
    """paramiko 5 says so with a TypeError from cryptography, older ones with their own."""
    return isinstance(e, paramiko.PasswordRequiredException) or (
        isinstance(e, TypeError) and "password" in str(e).lower())


def _public_blob(private: Path) -> bytes | None:
    """The key blob of PRIVATE.pub, if that file is there and readable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return base64.b64decode(private.with_name(private.name + ".pub").read_text().split()[1])
    return None


def _known_hosts_line(line: str,
                      where: str) -> tuple[str | None, list[str], str, bytes] | None:
    """(marker, host patterns, key type, key blob) of one known_hosts line, None for a blank
    line or a comment; BuildError naming FILE:LINE for a line OpenSSH could not use either."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if marker not in (None, "@revoked", "@cert-authority"):
        raise BuildError(f"{where}: broken known_hosts line: unknown marker {marker!r}",
                         hint="correct or delete that line")
    if len(fields) < 3:
        raise BuildError(f"{where}: broken known_hosts line: expected HOSTS KEY-TYPE KEY, "
                         f"found {len(fields)} field(s)", hint="correct or delete that line")
    if not fields[1].startswith(KEY_TYPE_PREFIXES):
        raise BuildError(f"{where}: broken known_hosts line: {fields[1]!r} is not a key type",
                         hint="correct or delete that line")
    try:
        blob = base64.b64decode(fields[2], validate=True)
    except ValueError:
        raise BuildError(f"{where}: broken known_hosts line: the {fields[1]} key is not "
                         "valid base64", hint="correct or delete that line") from None
    return marker, fields[0].split(","), fields[1], blob


def _checksum_text(a: Artifact) -> str:
    """The NAME.sha256 content, as written at build time (regenerated if it is missing)."""
    with contextlib.suppress(OSError):
        text = a.checksum_path.read_text()
        if parse_checksum_file(text, a.name) == a.sha256:
            return text
    return f"{a.sha256}  {a.name}\n"


def _clean_dest(dest: str) -> str:
    clean = posixpath.normpath(dest.strip("/"))
    if not dest or clean.startswith("..") or clean == "." or posixpath.isabs(clean):
        raise BuildError(f"mirror: bad destination {dest!r}")
    return clean


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
