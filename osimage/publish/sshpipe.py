"""The bulk bytes of an SSH publish through the OpenSSH client, at the speed of scp.

paramiko does every SSH packet's work in Python (0.6x of scp here); OpenSSH's `ssh` does it
in C. paramiko keeps what it does well: the host key check, authentication, listing, renames,
the lock and the checks (osimage/publish/sshpublish.py). For each large file, `ssh` runs
`cat > PARTIAL` (or `cat >> PARTIAL` to resume) on the mirror and the bytes are written into
its stdin by the same loop that reads and hashes them: the file is still read once.

What `ssh` trusts is exactly what paramiko checked: a private known_hosts holding the one host
key paramiko verified (under a HostKeyAlias, so no name matching is involved), strict host
key checking, batch mode (no prompt ever), the one key paramiko authenticated with (a file
path, or the agent's public key so that ssh asks the agent), no config files (paramiko reads
none either). No key material is in argv. When there is no `ssh` binary, or the mirror runs
no commands (an sftp-only account), the caller sends over SFTP as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import paramiko

from osimage.runner import check_interrupted, child_env, reap_group

# OpenSSH tries these in this order: aes128-gcm is the fastest where AES-NI exists (as here
# and on every server CPU of the last decade); chacha20 is OpenSSH's own default elsewhere.
CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com",
           "aes128-ctr", "aes256-ctr")
# known_hosts stores RSA keys as ssh-rsa; the handshake names their signature algorithms
HOST_KEY_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}
ALIAS = "osimage-mirror"
MARKER = b"osimage-pipe\n"  # printed by the remote shell before cat starts: commands run
PIPE_SIZE = 1 << 20
POLL_SECONDS = 0.05  # how often a stalled pipe looks for a stop request
KEEPALIVE_SECONDS = 15
START_SECONDS = 60.0  # connect, authenticate, start the shell
EXIT_SECONDS = 30.0  # ssh flushes the last bytes and the remote cat closes the file


class PipeUnavailable(Exception):
    """ssh could not run the remote command (no shell for this account, or ssh refused what
    paramiko accepted): send over SFTP instead."""


# sh -c whatever the account's login shell is; the path comes first on stdin (sh's read takes
# one byte at a time from a pipe, so cat gets exactly the rest), which lets the connection be
# made before the caller knows the path.
REMOTE = ("exec sh -c 'printf \"osimage-pipe\\n\"; IFS= read -r p && "
          "exec cat >> \"$p\"'")


@dataclass
class _Session:
    proc: subprocess.Popen[bytes]
    err: IO[bytes]

    def stop(self) -> bytes:
        """End ssh (if it still runs) and everything it started; close our ends; return
        what ssh and the remote command said."""
        if self.proc.poll() is None:  # stopped early: the partial stays as it is, to resume
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()  # reaped first: a zombie still counts as a live group
        reap_group(self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with self.err:
            self.err.seek(0)
            return self.err.read()


@dataclass
class SSHPipe:
    """How to start `ssh` to the mirror; made by SSHMirror.connect, valid while it is open."""

    argv: list[str]
    cipher: str = ""
    _ready: _Session | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, user: str, host: str, port: int, host_key: paramiko.PKey,
             identity: Path | paramiko.PKey, io_timeout: float) -> Iterator[SSHPipe | None]:
        """An SSHPipe for this connection (None without an `ssh` binary on PATH); identity is
        the key file paramiko authenticated with, or the agent's key it used."""
        ssh = shutil.which("ssh")
        if ssh is None:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="osimage-ssh-") as tmp:
            known = Path(tmp) / "known_hosts"
            known.write_text(f"{ALIAS} {host_key.get_name()} {host_key.get_base64()}\n")
            if isinstance(identity, Path):
                key_file = identity
            else:  # an agent's key: ssh offers the agent's private half for this public one
                key_file = Path(tmp) / "agent_key.pub"
                key_file.write_text(f"{identity.get_name()} {identity.get_base64()}\n")
            algorithms = HOST_KEY_ALGORITHMS.get(host_key.get_name(), (host_key.get_name(),))
            options = {
                "BatchMode": "yes", "StrictHostKeyChecking": "yes",
                "UserKnownHostsFile": str(known), "GlobalKnownHostsFile": "/dev/null",
                "HostKeyAlias": ALIAS, "HostKeyAlgorithms": ",".join(algorithms),
                "UpdateHostKeys": "no", "CheckHostIP": "no",
                "IdentityFile": str(key_file), "IdentitiesOnly": "yes",
                "PubkeyAuthentication": "yes", "PasswordAuthentication": "no",
                "KbdInteractiveAuthentication": "no", "GSSAPIAuthentication": "no",
                "Ciphers": ",".join(CIPHERS), "Compression": "no",
                "ConnectTimeout": "15", "ServerAliveInterval": str(KEEPALIVE_SECONDS),
                "ServerAliveCountMax": str(max(1, int(io_timeout // KEEPALIVE_SECONDS))),
                "ControlMaster": "no", "ControlPath": "none", "ClearAllForwardings": "yes",
                "ForwardAgent": "no", "ForwardX11": "no", "RequestTTY": "no",
            }
            argv = [ssh, "-F", "none", "-v", "-p", str(port), "-l", user]
            for name, value in options.items():
                argv += ["-o", f"{name}={value}"]
            pipe = cls(argv=[*argv, "--", host, REMOTE])
            try:
                yield pipe
            finally:
                pipe.cancel()

    def prestart(self) -> None:
        """Connect now, for the next send(): the handshake overlaps the caller's own work."""
        if self._ready is None:
            err = tempfile.TemporaryFile()  # noqa: SIM115 (the session closes it)
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, env=child_env(), start_new_session=True)
            self._ready = _Session(proc, err)

    def cancel(self) -> None:
        """End a prestarted connection that no send() took."""
        if self._ready is not None:
            self._ready.stop()
            self._ready = None

    def send(self, path: str, blocks: Iterator[bytes], sent: Callable[[bytes], None]) -> None:
        """Append the blocks to the file path on the mirror; sent(block) runs after each block
        went into the pipe. Raises PipeUnavailable (before taking any block) when the remote
        command does not start, Interrupted on a stop request, ConnectionError or
        TimeoutError when the connection broke, OSError when the mirror refused the write."""
        if "\n" in path:
            raise PipeUnavailable("a path with a line break")
        self.prestart()
        session, self._ready = self._ready, None
        assert session is not None
        proc = session.proc
        started = broken = False
        try:
            started = self._started(proc)
            if started:
                header = path.encode() + b"\n"
                broken = self._feed(proc, itertools.chain([header], blocks),
                                    lambda block: None if block is header else sent(block))
            code = self._wait(proc)
        finally:
            log = session.stop()
        check_interrupted()
        self.cipher = _cipher(log) or self.cipher
        if not started:
            raise PipeUnavailable(_reason(log) or f"ssh exited with status {code}")
        if code != 0 or broken:
            raise _error(log, code)

    @staticmethod
    def _started(proc: subprocess.Popen[bytes]) -> bool:
        """Wait for the remote shell's marker: True once it came, False if ssh ended first."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        got = b""
        deadline = time.monotonic() + START_SECONDS
        while MARKER not in got:  # after whatever the account's shell startup files print
            check_interrupted()
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, "ssh did not start the remote command")
            readable, _, _ = select.select([fd], [], [], POLL_SECONDS)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk or len(got) > 65536:
                    return False  # ended, or something else than our shell talks
                got += chunk
        return True

    @staticmethod
    def _feed(proc: subprocess.Popen[bytes], blocks: Iterator[bytes],
              sent: Callable[[bytes], None]) -> bool:
        """Write every block into ssh's stdin, looking for a stop request while the pipe is
        full; True if ssh went away first."""
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        with contextlib.suppress(OSError):  # a larger pipe: fewer wake-ups per MiB
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(fd, False)
        try:
            for block in blocks:
                view = memoryview(block)
                while view:
                    check_interrupted()
                    _, writable, _ = select.select([], [fd], [], POLL_SECONDS)
                    if not writable:
                        continue
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        return True
                sent(block)
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # end of file: the remote cat finishes
        return False

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes]) -> int:
        deadline = time.monotonic() + EXIT_SECONDS
        while (code := proc.poll()) is None:
            check_interrupted()
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, "ssh did not finish after the last byte")
            time.sleep(0.01)
        return code


def _cipher(log: bytes) -> str:
    for line in log.decode(errors="replace").splitlines():
        if "kex: client->server cipher:" in line:
            return line.split("cipher:", 1)[1].split()[0]
    return ""


def _reason(log: bytes) -> str:
    """The last thing ssh or the remote command said that is not ssh's debug chatter."""
    lines = [line.strip() for line in log.decode(errors="replace").splitlines()
             if line.strip() and not line.startswith(("debug", "Transferred:", "Bytes per"))]
    return lines[-1] if lines else ""


def _error(log: bytes, code: int) -> OSError:
    """The exception sshpublish's failure handling understands, from how ssh ended."""
    reason = _reason(log) or f"ssh exited with status {code}"
    if "No space left" in reason:
        return OSError(errno.ENOSPC, reason)
    if "quota exceeded" in reason.lower():
        return OSError(errno.EDQUOT, reason)
    if code == 255 or code < 0:  # ssh's own failure: the connection, not the command
        if "Timeout" in reason or "timed out" in reason:
            return TimeoutError(errno.ETIMEDOUT, reason)
        return ConnectionError(errno.ECONNRESET, reason)
    if "Permission denied" in reason:
        return OSError(errno.EACCES, reason)
    return OSError(errno.EIO, reason)
