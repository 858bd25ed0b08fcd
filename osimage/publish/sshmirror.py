"""The production mirror: upload over SSH (paramiko SFTP), then check each file over HTTP.

The site names it `mirror: {url: ssh://USER@HOST[:PORT]/ROOT, http: http://HOST/...}`; the
HTTP base serves ROOT, so builds/IMAGE/VERSION/FILE is reachable on both sides.

How a publish keeps the mirror consistent (lock, no replaced file, partial names, the HTTP
check, resuming): osimage/publish/sshpublish.py.

Host keys are checked against known_hosts (OpenSSH format, hashed entries included): an
unknown key is refused unless accept_new_host_key (CLI --accept-new-host-key only, never an
inherited environment variable), which appends it; a changed key is always refused.
Authentication: the site's identity_file, else ssh-agent, else ~/.ssh/id_{ed25519,ecdsa,rsa}.
Nothing secret is logged or passed in argv.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import paramiko

from osimage.errors import BuildError, ConfigError
from osimage.netreason import os_reason
from osimage.publish.artifacts import Artifact
from osimage.publish.mirrorurl import SSHLocation
from osimage.publish.sshpipe import SSHPipe
from osimage.publish.sshpublish import Progress, Publish, TransferStats, published

# aes128-gcm is the fastest cipher paramiko speaks (AES-NI, no separate MAC); the others are
# fallbacks for servers without it.
CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com", "aes256-ctr")
WINDOW = 64 << 20  # ours, for what the server sends (answers only, in an upload)
CONNECT_TIMEOUT = 15.0
IO_TIMEOUT = 120.0  # a mirror silent this long counts as a dropped connection
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
# known_hosts stores RSA keys as ssh-rsa; the handshake names their signature algorithms
KEY_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-")  # OpenSSH's; paramiko knows only some of them



def fingerprint(key: paramiko.PKey) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` shows it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {fingerprint(key)}"


class SSHMirror:
    """A Mirror (publish(artifacts, dest) -> paths) on a server reached over SSH."""

    def __init__(self, url: str, http_base: str, *, identity_file: Path | None = None,
                 known_hosts: Path | None = None, accept_new_host_key: bool = False,
                 check_free_space: bool = True, progress: Progress | None = None) -> None:
        self.location = SSHLocation.parse(url)
        self.http_base = http_base.rstrip("/")
        self.identity_file = identity_file
        self.known_hosts = known_hosts or Path("~/.ssh/known_hosts").expanduser()
        self.accept_new_host_key = accept_new_host_key
        self.check_free_space = check_free_space
        self.progress = progress
        self.stats = TransferStats()
        self.pipe: SSHPipe | None = None  # while connected: the OpenSSH client for bulk bytes
        self._auth_source: Path | paramiko.PKey | None = None

    @classmethod
    def from_settings(cls, url: str, settings: Mapping[str, Any], root: Path,
                      accept_new_host_key: bool = False) -> SSHMirror:
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
                   known_hosts=path("known_hosts"), accept_new_host_key=accept_new_host_key)

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
            raise BuildError(f"mirror {loc} unreachable: {os_reason(e)}",
                             hint="check that the mirror is up and sshd listens there") from None
        transport = paramiko.Transport(sock, default_window_size=WINDOW)
        try:
            options = transport.get_security_options()
            options.ciphers = CIPHERS
            options.key_types = self._key_types(options.key_types)
            try:
                transport.start_client(timeout=CONNECT_TIMEOUT)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise BuildError(f"mirror {loc}: SSH handshake failed: {os_reason(e)}") from None
            self._check_host_key(transport.get_remote_server_key())
            self._authenticate(transport)
            assert self._auth_source is not None
            transport.set_keepalive(15)
            self.stats.cipher = str(getattr(transport, "local_cipher", ""))
            try:
                sftp = paramiko.SFTPClient.from_transport(transport, window_size=WINDOW)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise BuildError(f"mirror {loc}: no SFTP service: {os_reason(e)}",
                                 hint="the mirror's sshd needs `Subsystem sftp`") from None
            if sftp is None:
                raise BuildError(f"mirror {loc}: no SFTP service")
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(IO_TIMEOUT)
            try:
                with SSHPipe.open(loc.user, loc.host, loc.port, transport.get_remote_server_key(),
                                  self._auth_source, IO_TIMEOUT) as self.pipe:
                    yield sftp
            finally:
                self.pipe = None
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
                raise BuildError(f"{path}: cannot read known hosts: {os_reason(e)}") from None
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
                             f"{os_reason(e)}") from None

    def _authenticate(self, transport: paramiko.Transport) -> None:
        loc = self.location
        tried: list[str] = []

        def attempt(key: paramiko.PKey, what: str, source: Path | None = None) -> bool:
            """source: the key's file, None for an agent's key."""
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
                                 f"{os_reason(e)}") from None
            if transport.is_authenticated():
                self._auth_source = source or key
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
                    if attempt(key, str(self.identity_file), self.identity_file):
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
                    if attempt(default_key, str(path), path):
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
            raise BuildError(f"mirror.identity_file {path}: cannot read it: {os_reason(e)}"
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
                             f"{os_reason(e).split('. See ')[0]}") from None

    # --- publishing ---------------------------------------------------------------------

    # --- publishing (publish/sshpublish.py) -------------------------------------------------

    def publish(self, artifacts: Sequence[Artifact], dest: str,
                replace: bool = False) -> list[str]:
        run = Publish(where=str(self.location), host=self.location.host, root=self.location.root,
                      http_base=self.http_base, io_timeout=IO_TIMEOUT, progress=self.progress,
                      check_free_space=self.check_free_space, pipe=lambda: self.pipe)
        self.stats = run.stats  # connect() records the cipher in it
        return run.run(self.connect, artifacts, dest, replace)

    def existing(self, dest: str) -> list[str]:
        with self.connect() as sftp:
            try:
                return published(sftp, self.location.root, dest)
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise BuildError(f"mirror {self.location}: cannot list {dest}: "
                                 f"{os_reason(e)}") from None


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
