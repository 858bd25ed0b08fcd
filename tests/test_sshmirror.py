"""Publishing to an SSH mirror: a real OpenSSH sshd and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osimage.errors import BuildError, ConfigError
from osimage.publish import artifacts
from osimage.publish.artifacts import Artifact
from osimage.publish.mirror import open_mirror
from osimage.publish.sshmirror import SSHMirror
from tests.servers import HTTPServer, SSHServer, b64_fingerprint, free_port, generate_ed25519

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                                reason="needs OpenSSH's sshd (apt-get install openssh-server)")

DEST = "builds/smoke/1.0"
MiB = 1 << 20


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


@pytest.fixture
def http(ssh: SSHServer) -> Iterator[HTTPServer]:
    with HTTPServer(ssh.root) as server:
        yield server


def make_artifact(directory: Path, name: str, size: int, seed: bytes = b"") -> Artifact:
    """A recorded artifact (NAME + NAME.sha256) of size pseudo-random bytes."""
    block = hashlib.sha256(seed + name.encode()).digest() * (MiB // 32) + os.urandom(4096)
    path = directory / name
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[:left])
            left -= min(left, len(block))
    return artifacts.record(path)


def mirror(ssh: SSHServer, http: HTTPServer, **kw: Any) -> SSHMirror:
    return SSHMirror(ssh.url, http.url, identity_file=ssh.client_key,
                     known_hosts=ssh.known_hosts, **kw)


def files_under(path: Path) -> list[str]:
    """Every file below path, relative, sorted (folders left out)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


def assert_published(ssh: SSHServer, arts: list[Artifact]) -> None:
    target = ssh.root / DEST
    expected = sorted(n for a in arts for n in (a.name, a.checksum_path.name))
    assert files_under(target) == expected
    for a in arts:
        assert artifacts.hash_file(target / a.name) == (a.size, a.sha256)
        assert (target / a.checksum_path.name).read_text() == a.checksum_path.read_text()
        assert (target / a.name).stat().st_mode & 0o777 == 0o644


def test_publish_uploads_verifies_and_lays_out(ssh: SSHServer, http: HTTPServer,
                                               tmp_path: Path) -> None:
    arts = [make_artifact(tmp_path, "smoke.qcow2", 3 * MiB + 12345),
            make_artifact(tmp_path, "smoke.iso", 200)]
    m = mirror(ssh, http)
    paths = m.publish(arts, DEST)
    assert paths == [f"{DEST}/smoke.qcow2", f"{DEST}/smoke.qcow2.sha256",
                     f"{DEST}/smoke.iso", f"{DEST}/smoke.iso.sha256"]
    assert_published(ssh, arts)
    assert m.stats.cipher == "aes128-gcm@openssh.com"
    assert m.stats.files_sent == 4
    assert m.stats.bytes_sent == sum(a.size for a in arts) + sum(
        a.checksum_path.stat().st_size for a in arts)


def test_second_publish_sends_nothing(ssh: SSHServer, http: HTTPServer,
                                      tmp_path: Path) -> None:
    arts = [make_artifact(tmp_path, "smoke.qcow2", 2 * MiB)]
    mirror(ssh, http).publish(arts, DEST)
    m = mirror(ssh, http)
    m.publish(arts, DEST)
    assert m.stats.files_already_there == 2
    assert m.stats.bytes_sent == 0
    assert_published(ssh, arts)


def test_a_file_of_other_bytes_in_place_is_replaced_with_replace(
        ssh: SSHServer, http: HTTPServer, tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "smoke.qcow2", MiB)
    target = ssh.root / DEST
    target.mkdir(parents=True)
    (target / art.name).write_bytes(b"x" * art.size)
    mirror(ssh, http).publish([art], DEST, replace=True)  # refused without: test_immutable.py
    assert_published(ssh, [art])


def test_open_mirror_dispatches_ssh_urls(ssh: SSHServer, http: HTTPServer,
                                         tmp_path: Path) -> None:
    settings = {"url": ssh.url, "http": http.url, "identity_file": str(ssh.client_key),
                "known_hosts": str(ssh.known_hosts)}
    m = open_mirror(ssh.url, tmp_path, settings)
    assert isinstance(m, SSHMirror)
    assert m.location.port == ssh.port and m.location.root == str(ssh.root)
    assert m.describe() == f"SSH mirror {ssh.user}@127.0.0.1:{ssh.port}{ssh.root}"
    m.publish([make_artifact(tmp_path, "a.img", 1000)], DEST)
    with pytest.raises(ConfigError, match=r"mirror\.http: required"):
        open_mirror(ssh.url, tmp_path, {"url": ssh.url})
    for bad in ("ssh://root@host", "ssh://root:secret@host/srv", "ssh://host:99999/x"):
        with pytest.raises(ConfigError):
            open_mirror(bad, tmp_path, {"http": http.url})


def test_unknown_host_key_is_refused_with_fingerprint(ssh: SSHServer, http: HTTPServer,
                                                      tmp_path: Path) -> None:
    ssh.known_hosts.write_text("")
    art = make_artifact(tmp_path, "smoke.qcow2", 1000)
    with pytest.raises(BuildError) as err:
        mirror(ssh, http, accept_new_host_key=False).publish([art], DEST)
    msg = str(err.value)
    assert "unknown host key" in msg and "ssh-ed25519" in msg
    assert b64_fingerprint(ssh.host_public) in msg
    assert "\n" not in msg
    assert err.value.hint is not None and "--accept-new-host-key" in err.value.hint
    assert not (ssh.root / "builds").exists()
    assert ssh.known_hosts.read_text() == ""


def test_accept_new_host_key_adds_it(ssh: SSHServer, http: HTTPServer, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    known = tmp_path / "ssh" / "known_hosts"  # neither the file nor its folder exist yet
    art = make_artifact(tmp_path, "smoke.qcow2", 1000)
    SSHMirror(ssh.url, http.url, identity_file=ssh.client_key, known_hosts=known,
              accept_new_host_key=True).publish([art], DEST)  # --accept-new-host-key
    assert known.read_text() == f"[127.0.0.1]:{ssh.port} {ssh.host_public}\n"
    m = SSHMirror(ssh.url, http.url, identity_file=ssh.client_key, known_hosts=known)
    assert not m.accept_new_host_key
    m.publish([art], DEST)
    assert known.read_text().count("\n") == 1


def test_changed_host_key_is_always_refused(ssh: SSHServer, http: HTTPServer,
                                            tmp_path: Path) -> None:
    other = generate_ed25519(tmp_path / "other_key", "other").split()
    ssh.known_hosts.write_text(f"[127.0.0.1]:{ssh.port} {other[0]} {other[1]}\n")
    art = make_artifact(tmp_path, "smoke.qcow2", 1000)
    with pytest.raises(BuildError, match="HOST KEY CHANGED") as err:
        mirror(ssh, http, accept_new_host_key=True).publish([art], DEST)
    assert b64_fingerprint(ssh.host_public) in str(err.value)
    assert ssh.known_hosts.read_text().count("\n") == 1
    assert not (ssh.root / "builds").exists()


def test_refused_authentication(ssh: SSHServer, http: HTTPServer, tmp_path: Path) -> None:
    stranger = tmp_path / "id_stranger"
    generate_ed25519(stranger, "stranger")
    art = make_artifact(tmp_path, "smoke.qcow2", 1000)
    m = SSHMirror(ssh.url, http.url, identity_file=stranger, known_hosts=ssh.known_hosts)
    with pytest.raises(BuildError, match="refused authentication") as err:
        m.publish([art], DEST)
    assert str(stranger) in str(err.value) and "\n" not in str(err.value)
    assert not (ssh.root / "builds").exists()


def test_unreachable_mirror(tmp_path: Path) -> None:
    url = f"ssh://root@127.0.0.1:{free_port()}/srv/mirror"
    m = SSHMirror(url, "http://127.0.0.1:1", known_hosts=tmp_path / "known_hosts")
    with pytest.raises(BuildError, match="unreachable: Connection refused"):
        m.publish([make_artifact(tmp_path, "a.img", 10)], DEST)


def test_http_check_catches_a_mirror_serving_other_bytes(ssh: SSHServer, tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "smoke.qcow2", 5000)
    elsewhere = tmp_path / "web"
    (elsewhere / DEST).mkdir(parents=True)
    (elsewhere / DEST / art.name).write_bytes(b"y" * art.size)
    with HTTPServer(elsewhere) as web, pytest.raises(BuildError, match="does not match"):
        mirror(ssh, web).publish([art], DEST)
    with HTTPServer(tmp_path / "empty") as web, pytest.raises(BuildError, match="404"):
        (tmp_path / "empty").mkdir()
        mirror(ssh, web).publish([art], DEST)


def test_artifact_changed_since_recorded(ssh: SSHServer, http: HTTPServer,
                                         tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "smoke.qcow2", 2 * MiB)
    with art.path.open("r+b") as f:
        f.seek(MiB)
        f.write(b"tampered")
    with pytest.raises(BuildError, match="changed since its checksum was recorded"):
        mirror(ssh, http).publish([art], DEST)
    assert files_under(ssh.root) == []


def test_stale_partial_of_other_bytes_is_not_resumed(ssh: SSHServer, http: HTTPServer,
                                                     tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "smoke.qcow2", 3 * MiB)
    target = ssh.root / DEST
    target.mkdir(parents=True)
    (target / f".{art.name}.partial-0123456789abcdef").write_bytes(b"z" * 2 * MiB)
    m = mirror(ssh, http)
    m.publish([art], DEST)
    assert m.stats.bytes_resumed == 0
    assert_published(ssh, [art])


def test_dropped_connection_leaves_nothing_final_and_resumes(ssh: SSHServer, http: HTTPServer,
                                                            tmp_path: Path) -> None:
    size = 96 * MiB + 777
    art = make_artifact(tmp_path, "smoke.qcow2", size)
    killed: list[int] = []

    def drop(name: str, done: int, total: int) -> None:
        if not killed and done >= 24 * MiB:
            killed.append(ssh.kill_sessions())

    with pytest.raises(BuildError, match=r"connection lost while uploading smoke\.qcow2") as err:
        mirror(ssh, http, progress=drop).publish([art], DEST)
    assert killed and killed[0] > 0
    assert "\n" not in str(err.value)
    target = ssh.root / DEST
    assert art.name not in os.listdir(target)
    [partial] = os.listdir(target)
    assert partial == f".{art.name}.partial-{art.sha256[:16]}"
    assert 0 < (target / partial).stat().st_size < size

    ssh.stop()
    ssh.start()
    m = mirror(ssh, http)
    m.publish([art], DEST)
    assert m.stats.bytes_resumed > 0
    assert m.stats.bytes_sent < size
    assert_published(ssh, [art])


@pytest.fixture
def small_disk(ssh: SSHServer) -> Iterator[Path]:
    """An 8 MiB tmpfs as the mirror's builds/ folder."""
    builds = ssh.root / "builds"
    builds.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(builds)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield builds
    finally:
        subprocess.run(["umount", str(builds)], check=True)


def test_disk_full_is_refused_before_sending(ssh: SSHServer, http: HTTPServer,
                                             small_disk: Path, tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "smoke.qcow2", 12 * MiB)
    m = mirror(ssh, http)
    with pytest.raises(BuildError, match=r"mirror disk full: builds/smoke/1.0 needs 12.0 MiB"):
        m.publish([art], DEST)
    assert m.stats.bytes_sent == 0
    assert files_under(small_disk) == []


def test_disk_full_midway(ssh: SSHServer, http: HTTPServer, small_disk: Path,
                          tmp_path: Path) -> None:
    arts = [make_artifact(tmp_path, "a.img", 3 * MiB), make_artifact(tmp_path, "b.img", 9 * MiB)]
    with pytest.raises(BuildError, match=r"mirror disk full while uploading b\.img") as err:
        mirror(ssh, http, check_free_space=False).publish(arts, DEST)
    assert "\n" not in str(err.value)
    assert files_under(small_disk) == []  # the partials were removed to give the space back
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    mirror(ssh, http).publish(arts, DEST)
    assert_published(ssh, arts)


def test_build_command_has_accept_new_host_key(capsys: pytest.CaptureFixture[str]) -> None:
    from osimage.cli import main

    assert main(["build", "--help"]) == 0
    assert "--accept-new-host-key" in capsys.readouterr().out


def test_missing_mirror_root_is_not_created(ssh: SSHServer, http: HTTPServer,
                                            tmp_path: Path) -> None:
    url = f"ssh://{ssh.user}@127.0.0.1:{ssh.port}{ssh.root}/typo"
    m = SSHMirror(url, http.url, identity_file=ssh.client_key, known_hosts=ssh.known_hosts)
    with pytest.raises(BuildError, match="is not a folder there"):
        m.publish([make_artifact(tmp_path, "a.img", 10)], DEST)
    assert not (ssh.root / "typo").exists()


def test_site_schema_wants_http_for_an_ssh_mirror() -> None:
    from osimage.config import validate

    with pytest.raises(ConfigError, match="missing required key 'http'"):
        validate({"mirror": {"url": "ssh://root@mirror/srv/mirror"}}, "site", "site.yaml")
    validate({"mirror": {"url": "ssh://root@mirror/srv/mirror", "http": "http://mirror/",
                         "identity_file": "~/.ssh/id_mirror", "known_hosts": "known_hosts"}},
             "site", "site.yaml")
    validate({"mirror": {"url": "mirror"}}, "site", "site.yaml")


def test_ctrl_c_stops_the_upload_and_the_next_run_resumes(ssh: SSHServer, http: HTTPServer,
                                                          tmp_path: Path) -> None:
    import signal

    from osimage.errors import Interrupted
    from osimage.runner import forwarded_signals

    size = 160 * MiB
    art = make_artifact(tmp_path, "smoke.qcow2", size)
    sent: list[int] = []

    def ctrl_c(name: str, done: int, total: int) -> None:
        if not sent and done >= 8 * MiB:
            sent.append(done)
            os.kill(os.getpid(), signal.SIGINT)

    with forwarded_signals(), pytest.raises(Interrupted):
        mirror(ssh, http, progress=ctrl_c).publish([art], DEST)
    assert os.listdir(ssh.root / DEST) == [f".{art.name}.partial-{art.sha256[:16]}"]
    m = mirror(ssh, http)
    with forwarded_signals():  # a new run starts with no stop request
        m.publish([art], DEST)
    assert 0 < m.stats.bytes_sent < size
    assert_published(ssh, [art])
