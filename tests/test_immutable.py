"""Released files never change (issue 12.2): a version a release records is refused before the
VM starts, a published file gets other bytes only with --replace (local and SSH mirror alike),
and of two hosts publishing the same version at once one wins, the other fails on the lock
that lives on the mirror."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from osimage.publish import artifacts, pending
from osimage.publish.artifacts import Artifact
from osimage.publish.mirror import LocalMirror
from osimage.publish.mirrorlock import PublishRefused
from osimage.publish.sshmirror import SSHMirror
from tests.conftest import build_py, git, tree_snapshot
from tests.servers import HTTPServer, SSHServer

MiB = 1 << 20
RELEASED = "3.0.0"


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


def ssh_site(repo: Path, ssh: SSHServer, http_url: str) -> Path:
    path = repo.parent / f"site-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(f"mirror:\n  url: {ssh.url}\n  http: {http_url}\n"
                    f"  identity_file: {ssh.client_key}\n  known_hosts: {ssh.known_hosts}\n")
    return path


def fill(path: Path, size: int, seed: bytes) -> None:
    """size bytes that differ with seed (a 1 MiB pattern repeated, a distinct tail)."""
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[:left])
            left -= min(left, len(block))
        f.write(seed)


def kept_build(repo: Path, version: str, size: int, seed: bytes) -> Artifact:
    """A build of smoke VERSION whose publish did not happen, as the build keeps it: its output
    and build/smoke/VERSION/publish.json (written by the project's own pending.save)."""
    work = repo / "build" / "smoke" / version
    path = work / "output" / "smoke.qcow2"
    fill(path, size, seed)
    art = artifacts.record(path)
    dest = f"builds/smoke/{version}"
    entry = {"name": "smoke", "builder_type": "qemu", "build_time": int(time.time()),
             "files": [{"name": art.name, "size": art.size}], "artifact_id": "smoke",
             "packer_run_uuid": str(uuid.uuid4()),
             "custom_data": {"version": version, "release": None, "dirty": False,
                             "git_commit": git(repo, "rev-parse", "HEAD").strip(),
                             "sha256": {art.name: art.sha256}, "mirror_path": dest}}
    pending.save(work, dest, [art], entry)
    return art


def errors_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def record_release(repo: Path, version: str) -> None:
    """manifests/manifest.yaml with release RELEASED naming smoke VERSION, committed."""
    commit = git(repo, "rev-parse", "HEAD").strip()
    (repo / "manifests/manifest.yaml").write_text(
        f"releases:\n  '{RELEASED}':\n    images:\n      smoke:\n        version: '{version}'\n"
        f"        git_commit: {commit}\n        files:\n"
        f"          - path: builds/smoke/{version}/smoke.qcow2\n            size: 1234\n"
        f"            sha256: {'a' * 64}\n")
    git(repo, "commit", "-qam", f"release {RELEASED}")


def test_released_version_is_refused_before_the_vm(repo: Path) -> None:
    record_release(repo, RELEASED)
    before = tree_snapshot(repo)
    proc = build_py(repo, "smoke", "--release", RELEASED)
    assert proc.returncode == 2, proc.stderr
    [line] = errors_of(proc.stderr)
    assert "manifests/manifest.yaml" in line and f"release {RELEASED}" in line, line
    assert "packer build" not in proc.stderr and "Traceback" not in proc.stderr
    assert tree_snapshot(repo) == before  # no output, no mirror, no manifest.json
    # --replace does not open a released version either, nor does publishing a kept build
    assert build_py(repo, "smoke", "--release", RELEASED, "--replace").returncode == 2
    kept_build(repo, RELEASED, 1000, b"kept")
    proc = build_py(repo, "publish", "smoke", RELEASED, "--replace")
    assert proc.returncode == 2, proc.stderr
    [line] = errors_of(proc.stderr)
    assert f"release {RELEASED}" in line
    assert not (repo / "mirror" / "builds" / "smoke" / RELEASED).exists()


def test_rebuilding_a_published_version_needs_replace(repo: Path) -> None:
    version = f"g{git(repo, 'rev-parse', 'HEAD').strip()[:10]}"
    published = repo / "mirror" / "builds" / "smoke" / version
    fill(published / "smoke.qcow2", 4096, b"published")
    before = (published / "smoke.qcow2").read_bytes()
    proc = build_py(repo, "smoke")
    assert proc.returncode == 2, proc.stderr
    [line] = errors_of(proc.stderr)
    assert f"builds/smoke/{version} is already published (smoke.qcow2)" in line
    assert "--replace" in proc.stderr
    assert "packer build" not in proc.stderr
    assert (published / "smoke.qcow2").read_bytes() == before
    assert not (repo / "images/smoke/manifest.json").exists()


def test_local_mirror_never_replaces_without_replace(tmp_path: Path) -> None:
    mirror = LocalMirror(tmp_path / "mirror")
    fill(tmp_path / "a" / "disk.qcow2", 3 * MiB, b"first")
    fill(tmp_path / "b" / "disk.qcow2", 3 * MiB, b"second")
    first, second = (artifacts.record(tmp_path / d / "disk.qcow2") for d in "ab")
    mirror.publish([first], "builds/img/1.0")
    mirror.publish([first], "builds/img/1.0")  # the same bytes again: nothing changes
    target = tmp_path / "mirror/builds/img/1.0"
    with pytest.raises(PublishRefused, match=r"already published with other bytes "
                                             r"\(disk\.qcow2, disk\.qcow2\.sha256\)") as err:
        mirror.publish([second], "builds/img/1.0")
    assert err.value.exit_code == 2
    assert (target / "disk.qcow2").read_bytes() == first.path.read_bytes()
    assert sorted(os.listdir(target)) == ["disk.qcow2", "disk.qcow2.sha256"]
    assert sorted(os.listdir(target.parent)) == ["1.0"]  # the lock is gone
    mirror.publish([second], "builds/img/1.0", replace=True)
    assert (target / "disk.qcow2").read_bytes() == second.path.read_bytes()


def test_ssh_mirror_never_replaces_without_replace(ssh: SSHServer, tmp_path: Path) -> None:
    fill(tmp_path / "a" / "disk.qcow2", 3 * MiB, b"first")
    fill(tmp_path / "b" / "disk.qcow2", 3 * MiB + 1, b"second")
    first, second = (artifacts.record(tmp_path / d / "disk.qcow2") for d in "ab")
    target = ssh.root / "builds/img/1.0"
    with HTTPServer(ssh.root) as http:
        def mirror() -> SSHMirror:
            return SSHMirror(ssh.url, http.url, identity_file=ssh.client_key,
                             known_hosts=ssh.known_hosts)

        mirror().publish([first], "builds/img/1.0")
        m = mirror()
        with pytest.raises(PublishRefused, match=r"already published with other bytes"):
            m.publish([second], "builds/img/1.0")
        assert m.stats.bytes_sent == 0
        assert (target / "disk.qcow2").read_bytes() == first.path.read_bytes()
        assert sorted(os.listdir(target)) == ["disk.qcow2", "disk.qcow2.sha256"]
        assert sorted(os.listdir(target.parent)) == ["1.0"]
        mirror().publish([second], "builds/img/1.0", replace=True)
    assert (target / "disk.qcow2").read_bytes() == second.path.read_bytes()


def test_stale_lock_of_a_dead_publisher_is_taken_over(tmp_path: Path) -> None:
    fill(tmp_path / "disk.qcow2", 1000, b"x")
    art = artifacts.record(tmp_path / "disk.qcow2")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock = tmp_path / "mirror/builds/img/.1.0.publish-lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead),
                                "since": "2026-01-01T00:00:00Z"}))
    LocalMirror(tmp_path / "mirror").publish([art], "builds/img/1.0")
    assert not lock.exists()


def test_two_hosts_publish_the_same_version(repo: Path, ssh: SSHServer, tmp_path: Path) -> None:
    """Two clones (two hosts) publish their own build of 1.0 into one real sshd mirror."""
    other = tmp_path / "other-host"
    subprocess.run(["git", "clone", "-q", str(repo), str(other)], check=True)
    mine = kept_build(repo, "1.0", 384 * MiB, b"host-a")
    theirs = kept_build(other, "1.0", 384 * MiB, b"host-b")
    target = ssh.root / "builds/smoke/1.0"
    with HTTPServer(ssh.root) as http:
        site = ssh_site(repo, ssh, http.url)
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
        first = subprocess.Popen([sys.executable, str(repo / "build.py"), "publish", "smoke",
                                  "1.0", "--site", str(site)], cwd=repo, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (target.is_dir() and any(n.startswith(".smoke.qcow2.partial-")
                                           for n in os.listdir(target))):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = build_py(other, "publish", "smoke", "1.0", "--site", str(site))
        still_uploading = first.poll() is None
        _, err = first.communicate(timeout=120)
        # the loser's build is kept; publishing it later is refused: other bytes, no --replace
        again = build_py(other, "publish", "smoke", "1.0", "--site", str(site))
    assert first.returncode == 0, err
    assert still_uploading, "the first publish ended before the second one tried"
    assert second.returncode == 1, second.stderr
    [line] = errors_of(second.stderr)
    assert "locked by" in line and ".1.0.publish-lock" in line, line
    assert "Traceback" not in second.stderr
    # every file on the mirror is the winner's, whole; no lock, no partial is left
    assert sorted(os.listdir(target)) == ["smoke.qcow2", "smoke.qcow2.sha256"]
    assert artifacts.hash_file(target / "smoke.qcow2") == (mine.size, mine.sha256)
    assert (target / "smoke.qcow2.sha256").read_text() == mine.checksum_path.read_text()
    assert sorted(os.listdir(target.parent)) == ["1.0"]
    recorded = json.loads((repo / "images/smoke/manifest.json").read_text())["builds"]
    assert [b["custom_data"]["sha256"] for b in recorded] == [{"smoke.qcow2": mine.sha256}]
    assert again.returncode == 2, again.stderr
    assert "already published with other bytes" in again.stderr
    assert artifacts.hash_file(target / "smoke.qcow2") == (mine.size, mine.sha256)
    assert theirs.path.is_file()
