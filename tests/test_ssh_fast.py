"""SSH at the speed of OpenSSH (issue 18.3): a large file's bytes go through the `ssh` client
(the host key paramiko verified, strict checking, batch mode, no key material in argv), small
files and the checks over paramiko's SFTP; no `ssh` on PATH, or an sftp-only account, sends
over SFTP. Real sshd and HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from osimage.errors import BuildError
from osimage.publish import artifacts
from osimage.publish.sshmirror import SSHMirror
from tests.servers import HTTPServer, SSHServer, _children
from tests.test_sshmirror import DEST, assert_published, files_under, make_artifact, mirror

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                                reason="needs OpenSSH's sshd (apt-get install openssh-server)")

MiB = 1 << 20
LARGE = 40 * MiB  # above PIPE_MIN_SIZE (32 MiB): sent through ssh


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


@pytest.fixture
def http(ssh: SSHServer) -> Iterator[HTTPServer]:
    with HTTPServer(ssh.root) as server:
        yield server


def ssh_clients() -> list[list[str]]:
    """argv of every `ssh` process this test process started."""
    found = []
    for pid in _children(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode()).name == "ssh":
            found.append([a.decode() for a in argv if a])
    return found


def test_a_large_file_goes_through_the_openssh_client(ssh: SSHServer, http: HTTPServer,
                                                       tmp_path: Path) -> None:
    arts = [make_artifact(tmp_path, "smoke.qcow2", LARGE + 4321),
            make_artifact(tmp_path, "smoke.iso", 5000)]
    known_before = ssh.known_hosts.read_text()
    seen: list[list[str]] = []
    known_files: list[str] = []

    def watch(name: str, done: int, total: int) -> None:
        if name == "smoke.qcow2" and not seen and done >= 8 * MiB:
            seen.extend(ssh_clients())
            for argv in seen:
                for arg in argv:
                    if arg.startswith("UserKnownHostsFile="):
                        known_files.append(Path(arg.split("=", 1)[1]).read_text())

    m = mirror(ssh, http, progress=watch)
    m.publish(arts, DEST)
    assert_published(ssh, arts)
    assert m.stats.channel == "ssh"
    assert m.stats.cipher == "aes128-gcm@openssh.com"
    assert m.stats.bytes_sent == sum(a.size for a in arts) + sum(
        a.checksum_path.stat().st_size for a in arts)
    [argv] = seen  # one ssh client, for the one large file
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes",
            f"IdentityFile={ssh.client_key}", "GlobalKnownHostsFile=/dev/null"} <= set(argv)
    key_text = ssh.client_key.read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert not any(body[:40] in arg or "PRIVATE KEY" in arg for arg in argv)
    # ssh trusts exactly the one host key paramiko verified, and nothing else
    assert known_files == [f"osimage-mirror {ssh.host_public}\n"]
    assert ssh.known_hosts.read_text() == known_before
    assert ssh_clients() == []  # no ssh client is left running


def test_no_ssh_binary_sends_over_sftp(ssh: SSHServer, http: HTTPServer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    art = make_artifact(tmp_path, "smoke.qcow2", LARGE)
    m = mirror(ssh, http)
    m.publish([art], DEST)
    assert m.stats.channel == "sftp"
    assert_published(ssh, [art])


def test_an_sftp_only_account_sends_over_sftp(tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    with SSHServer(extra_config=("ForceCommand internal-sftp",)) as ssh, \
            HTTPServer(ssh.root) as http:
        arts = [make_artifact(tmp_path, "a.img", LARGE), make_artifact(tmp_path, "b.img", LARGE)]
        m = mirror(ssh, http)
        m.publish(arts, DEST)
        assert m.stats.channel == "sftp"
        assert_published(ssh, arts)
    out = capfd.readouterr().out
    assert out.count("ssh cannot run commands there") == 1  # said once, not per file


def test_remote_paths_are_quoted(tmp_path: Path) -> None:
    odd = tmp_path / "mirror root's $(touch PWNED); `touch PWNED2` \"x\""
    with SSHServer(root=odd) as ssh, HTTPServer(ssh.root) as http:
        url = f"ssh://{ssh.user}@127.0.0.1:{ssh.port}{urllib.parse.quote(str(odd))}"
        art = make_artifact(tmp_path, "smoke image.qcow2", LARGE)
        m = SSHMirror(url, http.url, identity_file=ssh.client_key, known_hosts=ssh.known_hosts)
        m.publish([art], DEST)
        assert m.stats.channel == "ssh"
        assert artifacts.hash_file(odd / DEST / art.name) == (art.size, art.sha256)
    assert not list(Path.home().glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))


def test_a_dropped_pipe_resumes_through_ssh(ssh: SSHServer, http: HTTPServer,
                                            tmp_path: Path) -> None:
    size = 96 * MiB + 777
    art = make_artifact(tmp_path, "smoke.qcow2", size)
    killed: list[int] = []

    def drop(name: str, done: int, total: int) -> None:
        if not killed and done >= 40 * MiB:
            killed.append(ssh.kill_sessions())

    with pytest.raises(BuildError, match=r"connection lost while uploading smoke\.qcow2") as err:
        mirror(ssh, http, progress=drop).publish([art], DEST)
    assert "\n" not in str(err.value)
    target = ssh.root / DEST
    [partial] = os.listdir(target)
    assert partial == f".{art.name}.partial-{art.sha256[:16]}"
    have = (target / partial).stat().st_size
    assert 16 * MiB < have < size
    m = mirror(ssh, http)
    m.publish([art], DEST)
    assert m.stats.channel == "ssh"
    assert m.stats.bytes_resumed > 16 * MiB - 2 * MiB
    assert m.stats.bytes_sent < size - 16 * MiB
    assert_published(ssh, [art])


def test_disk_full_through_ssh(ssh: SSHServer, http: HTTPServer, tmp_path: Path) -> None:
    builds = ssh.root / "builds"
    builds.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(builds)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        arts = [make_artifact(tmp_path, "a.img", 8 * MiB),
                make_artifact(tmp_path, "b.img", LARGE + MiB)]
        m = mirror(ssh, http, check_free_space=False)
        with pytest.raises(BuildError, match=r"mirror disk full while uploading b\.img") as err:
            m.publish(arts, DEST)
        assert m.stats.channel == "ssh"
        assert "\n" not in str(err.value)
        assert files_under(builds) == []  # the partials were removed to give the space back
    finally:
        subprocess.run(["umount", str(builds)], check=True)


def test_an_agent_key_is_used_by_ssh_too(ssh: SSHServer, http: HTTPServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No identity_file: paramiko authenticates with the agent's key, and so does ssh (its
    public half in a temporary file, the private one stays in the agent)."""
    home = tmp_path / "home"
    home.mkdir()  # no ~/.ssh/id_*: only the agent has a key
    monkeypatch.setenv("HOME", str(home))
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(["ssh-add", "-q", str(ssh.client_key)], check=True,
                       capture_output=True)
        art = make_artifact(tmp_path, "smoke.qcow2", LARGE)
        m = SSHMirror(ssh.url, http.url, known_hosts=ssh.known_hosts)
        m.publish([art], DEST)
        assert m.stats.channel == "ssh"
        assert_published(ssh, [art])
    finally:
        agent.terminate()
        agent.wait()
