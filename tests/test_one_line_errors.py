"""What a release engineer sees when the mirror's SSH setup, its URL or a lock is wrong: one
`error:` line naming the real cause (and a hint how to fix it below), never a traceback.

The real ./build.py of a test clone against a real sshd on 127.0.0.1; each fails before the VM.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osimage.errors import BuildError
from osimage.publish.sshmirror import SSHMirror
from tests.conftest import build_py, git, tree_snapshot
from tests.servers import HTTPServer, SSHServer
from tests.test_preflight import one_error_line

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                                reason="needs OpenSSH's sshd (apt-get install openssh-server)")


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


@pytest.fixture
def http(ssh: SSHServer) -> Iterator[HTTPServer]:
    with HTTPServer(ssh.root) as server:
        yield server


@pytest.fixture
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def site(repo: Path, ssh: SSHServer, http: HTTPServer, *, identity: Path | None = None,
         known_hosts: Path | None = None, url: str | None = None) -> Path:
    path = repo.parent / "site.yaml"
    text = f"mirror:\n  url: '{url or ssh.url}'\n  http: {http.url}\n" \
           f"  known_hosts: {known_hosts or ssh.known_hosts}\n"
    if identity is not None:
        text += f"  identity_file: {identity}\n"
    path.write_text(text)
    return path


def failed(proc: subprocess.CompletedProcess[str], status: int = 1) -> str:
    assert proc.returncode == status, proc.stderr
    line = one_error_line(proc)
    assert "packer build" not in proc.stderr
    return line


def passphrase_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass", "-C", "locked", "-f",
                    str(path)], check=True)
    return path


def test_passphrase_identity_file_without_agent(repo: Path, ssh: SSHServer, http: HTTPServer,
                                                no_agent: None) -> None:
    key = passphrase_key(repo.parent / "id_locked")
    proc = build_py(repo, "smoke", "--site", str(site(repo, ssh, http, identity=key)))
    line = failed(proc)
    assert f"the key {key} is passphrase-protected and no ssh-agent is running" in line
    assert "ssh-add" in proc.stderr and "unencrypted deploy key" in proc.stderr


def test_passphrase_default_key_without_agent(repo: Path, ssh: SSHServer, http: HTTPServer,
                                              no_agent: None) -> None:
    home = repo.parent / "home"
    (home / ".ssh").mkdir(parents=True)
    key = passphrase_key(home / ".ssh" / "id_ed25519")
    proc = build_py(repo, "smoke", "--site", str(site(repo, ssh, http)), env={"HOME": str(home)})
    line = failed(proc)
    assert f"the key {key} is passphrase-protected and no ssh-agent is running" in line
    assert "ssh-add" in proc.stderr and "unencrypted deploy key" in proc.stderr


def test_public_key_given_as_identity_file(repo: Path, ssh: SSHServer,
                                           http: HTTPServer) -> None:
    public = ssh.client_key.with_name(ssh.client_key.name + ".pub")
    proc = build_py(repo, "smoke", "--site", str(site(repo, ssh, http, identity=public)))
    line = failed(proc)
    assert line == (f"error: mirror.identity_file {public} is a public key; it must name the "
                    f"private key ({ssh.client_key})")


@pytest.mark.parametrize(("broken", "why"), [
    ("garbage", "expected HOSTS KEY-TYPE KEY, found 1 field(s)"),
    ("this is garbage", "'is' is not a key type"),
    ("[127.0.0.1]:22 ssh-ed25519 AAAA!!not-base64", "the ssh-ed25519 key is not valid base64"),
    ("@revoked [127.0.0.1]:22 ssh-ed25519 AAAAC3Nza", "the ssh-ed25519 key is not valid base64"),
])
def test_broken_known_hosts_line(repo: Path, ssh: SSHServer, http: HTTPServer, broken: str,
                                 why: str) -> None:
    known = repo.parent / "known_hosts"
    known.write_text(ssh.known_hosts.read_text() + broken + "\n")
    proc = build_py(repo, "smoke", "--site",
                    str(site(repo, ssh, http, identity=ssh.client_key, known_hosts=known)))
    line = failed(proc)
    assert line == f"error: {known}:2: broken known_hosts line: {why}"


@pytest.mark.parametrize(("url", "why"), [
    ("ssh://root@:22x/", "no host name"),
    ("ssh://root@127.0.0.1:22x/srv/mirror", "the port '22x' is not a number from 1 to 65535"),
    ("ssh://[::1/srv/mirror", "not a valid URL (Invalid IPv6 URL)"),
    ("ssh://root@127.0.0.1", "no mirror root folder after the host"),
])
def test_malformed_mirror_url(repo: Path, ssh: SSHServer, http: HTTPServer, url: str,
                              why: str) -> None:
    path = site(repo, ssh, http, identity=ssh.client_key, url=url)
    before = tree_snapshot(repo)
    proc = build_py(repo, "smoke", "--site", str(path))
    line = failed(proc, status=2)
    assert line.startswith(f"error: {path}: mirror.url: {url!r}: {why}")
    assert "==> " not in proc.stderr
    assert tree_snapshot(repo) == before and not (repo / "build/smoke").exists()


@pytest.fixture
def immutable_builds(ssh: SSHServer) -> Iterator[Path]:
    """The mirror's builds/ folder, which not even root may write into (sshd runs as root
    here: a chmod would not stop it)."""
    builds = ssh.root / "builds"
    builds.mkdir()
    if subprocess.run(["chattr", "+i", str(builds)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        yield builds
    finally:
        subprocess.run(["chattr", "-i", str(builds)], check=True)


def test_mirror_folder_that_cannot_be_created(repo: Path, ssh: SSHServer, http: HTTPServer,
                                              immutable_builds: Path) -> None:
    proc = build_py(repo, "smoke", "--site", str(site(repo, ssh, http,
                                                      identity=ssh.client_key)))
    line = failed(proc)
    assert f"cannot write to {immutable_builds}: permission denied" in line
    assert "no such file" not in line.lower()


def test_publish_into_a_folder_that_cannot_be_created(ssh: SSHServer, http: HTTPServer,
                                                      immutable_builds: Path,
                                                      tmp_path: Path) -> None:
    from osimage.publish import artifacts

    disk = tmp_path / "smoke.qcow2"
    disk.write_bytes(b"disk")
    m = SSHMirror(ssh.url, http.url, identity_file=ssh.client_key, known_hosts=ssh.known_hosts)
    with pytest.raises(BuildError) as err:
        m.publish([artifacts.record(disk)], "builds/smoke/1.0")
    msg = str(err.value)
    assert f"cannot create {immutable_builds}/smoke: Permission denied" in msg
    assert "\n" not in msg and "no such file" not in msg.lower()


def test_lock_that_cannot_be_taken(repo: Path) -> None:
    version = "g" + git(repo, "rev-parse", "HEAD").strip()[:10]
    lock = repo / "build" / "smoke" / f"{version}.lock"
    lock.mkdir(parents=True)  # a folder where the lock file should be
    proc = build_py(repo, "smoke")
    line = failed(proc)
    assert line == f"error: cannot take the lock {lock}: Is a directory"


def test_passphrase_identity_file_held_by_the_agent(ssh: SSHServer, http: HTTPServer,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As OpenSSH does, the agent's copy of a protected identity file is used."""
    key = passphrase_key(tmp_path / "id_locked")
    (ssh.workdir / "authorized_keys").write_text(key.with_name("id_locked.pub").read_text())
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho pass\n")
    askpass.chmod(0o700)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock), "SSH_ASKPASS": str(askpass),
               "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        subprocess.run(["ssh-add", str(key)], env=env, check=True, capture_output=True,
                       stdin=subprocess.DEVNULL)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        m = SSHMirror(ssh.url, http.url, identity_file=key, known_hosts=ssh.known_hosts)
        with m.connect() as sftp:
            assert sftp.normalize(str(ssh.root)) == str(ssh.root)
    finally:
        agent.terminate()
        agent.wait()
