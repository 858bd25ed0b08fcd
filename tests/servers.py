"""Real servers on 127.0.0.1 for tests and benchmarks: OpenSSH's sshd and Python's http.server.

Nothing here depends on pytest, so tests, benchmarks and scripts share them:

    with SSHServer() as ssh, HTTPServer(ssh.root) as http:
        mirror_url = ssh.url          # ssh://root@127.0.0.1:PORT/ROOT
        ...                           # ssh.client_key, ssh.known_hosts, http.url

Each SSHServer has its own generated host key and client key, its own config, log and pid
file in a private folder, and listens on a free port of 127.0.0.1 only. Stopping it also ends
the per-connection sshd processes, which outlive the listener otherwise.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import getpass
import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless run by its absolute path
START_TIMEOUT = 10.0


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def generate_ed25519(path: Path, comment: str) -> str:
    """Write an unencrypted OpenSSH ed25519 key to path (0600) and path.pub; return the
    public line ("ssh-ed25519 AAAA... comment")."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    line = f"{public} {comment}"
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


def _children(pid: int) -> list[int]:
    """All descendants of pid, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SSHServer:
    """A real OpenSSH sshd on 127.0.0.1: key authentication only, internal-sftp.

    Attributes: port, root (the folder tests publish into; a mirror root), client_key (private
    key file whose public half is authorised), known_hosts (a file that trusts this server's
    host key), host_public ("ssh-ed25519 AAAA..."), user, url, log.
    """

    def __init__(self, root: Path | None = None, *, user: str | None = None,
                 extra_config: tuple[str, ...] = ()) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="osimage-sshd-"))
        self.root = root if root is not None else self.workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.user = user or getpass.getuser()
        self.extra_config = extra_config
        self.port = 0
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.log = self.workdir / "sshd.log"
        self.host_public = " ".join(generate_ed25519(self.host_key, "test-host").split()[:2])
        client_public = generate_ed25519(self.client_key, "test-client")
        (self.workdir / "authorized_keys").write_text(client_public + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host_pattern(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{self.root}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ssh_options(self) -> list[str]:
        """Options for ssh/scp/sftp to reach this server with the client key."""
        return ["-o", f"Port={self.port}", "-o", f"IdentityFile={self.client_key}",
                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", f"User={self.user}"]

    def _write_config(self) -> Path:
        config = self.workdir / "sshd_config"
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "MaxStartups 50",
            "Subsystem sftp internal-sftp",
            *self.extra_config,
        ]
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        """Start sshd (on the same port again after stop(), so URLs stay valid)."""
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        keep_port = self.port != 0
        for _ in range(5):
            if not keep_port:
                self.port = free_port()
            config = self._write_config()
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready():
                self.known_hosts.write_text(f"{self.host_pattern} {self.host_public}\n")
                return
            self._proc.wait()
            self._proc = None
            if keep_port and "Address already in use" in self.log.read_text(errors="replace"):
                time.sleep(0.5)
        raise RuntimeError(f"sshd did not start; its log:\n{self.log.read_text(errors='replace')}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                if s.recv(8).startswith(b"SSH-"):
                    return True
            time.sleep(0.05)
        return False

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (they run the sftp subsystem)."""
        return _children(self._proc.pid) if self._proc is not None else []

    def kill_sessions(self) -> int:
        """Kill every connection's sshd process, as a network drop would end it; return how
        many were killed."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def sessions_cpu_seconds(self) -> float:
        """CPU time (user + system) of the connection processes that have ended so far."""
        if self._proc is None:
            return 0.0
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cutime, cstime = int(fields[13]), int(fields[14])  # stat fields 16 and 17
        return (cutime + cstime) / os.sysconf("SC_CLK_TCK")

    def wait_sessions_ended(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.session_pids() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        if self._proc is None:
            return
        self.kill_sessions()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HidingHandler(_QuietHandler):
    """Answers 404 for every path under hidden (a web server that serves only part of the
    mirror: its root answers the pre-build probe, its builds/ do not)."""

    hidden = ""

    def send_head(self) -> Any:
        if self.path.startswith(self.hidden):
            self.send_error(404)
            return None
        return super().send_head()


class HTTPServer:
    """Python's http.server serving directory on a free port of 127.0.0.1, in a thread;
    with hide, every path starting so answers 404.

    url is "http://127.0.0.1:PORT" (no trailing slash).
    """

    def __init__(self, directory: Path, hide: str | None = None) -> None:
        self.directory = directory
        base: type[_QuietHandler] = _QuietHandler
        if hide is not None:
            base = type("Hiding", (_HidingHandler,), {"hidden": hide})
        handler = functools.partial(base, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def b64_fingerprint(public_line: str) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` prints it, of an "ssh-TYPE AAAA..." line."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
