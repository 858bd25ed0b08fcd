"""Incremental builds (issue 16.2): an image whose inputs hash equals its last clean published
build's, with that build's files on the mirror as recorded, is up to date: ./build.py IMAGE
says which build it reused and why, and exits 0 without starting a VM; anything that changes
the inputs, a file missing on the mirror, a dirty tree or --rebuild builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_py, git, make_repo, qemu_pids, under_load
from tests.servers import HTTPServer, SSHServer

MANIFEST = Path("images/smoke/manifest.json")


def builds(repo: Path) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((repo / MANIFEST).read_text())["builds"]
    return data


def watched(repo: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float, set[int]]:
    """./build.py ARGS, its wall time and every qemu of the repo seen while it ran."""
    seen: set[int] = set()
    env = {k: v for k, v in os.environ.items() if k != "OSIMAGE_ROOT"}
    env.update(NO_COLOR="1", COLUMNS="200")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(repo / "build.py"), *args], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    while proc.poll() is None:
        seen |= qemu_pids(repo)
        time.sleep(0.02)
    out, err = proc.communicate()
    return (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
            time.monotonic() - t0, seen)


def commit_change(repo: Path, rel: str, text: str) -> None:
    path = repo / rel
    path.write_text(path.read_text() + text)
    git(repo, "commit", "-qam", f"change {rel}")


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory, smoke_sources: Path) -> Path:
    """A repository where smoke was built and published once: the first build of every test
    here, made once (each test then works on its own copy)."""
    import hashlib

    root = make_repo(tmp_path_factory.mktemp("uptodate") / "repo")
    sources = root / "build" / "sources" / "smoke"
    shutil.copytree(smoke_sources, sources)
    script = root / "scripts" / "make-smoke-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    first = build_py(root, "smoke")
    assert first.returncode == 0, first.stderr
    assert len(builds(root)) == 1
    return root


@pytest.fixture
def repo(tmp_path: Path, built_once: Path) -> Path:
    """This test's copy of the built repository: the same git history (so the same version
    and commit), manifest.json, build/ and mirror."""
    return Path(shutil.copytree(built_once, tmp_path / "repo", symlinks=True))


def test_unchanged_image_is_up_to_date(repo: Path) -> None:
    version = builds(repo)[0]["custom_data"]["version"]
    commit = builds(repo)[0]["custom_data"]["git_commit"]

    # a site's sources.smoke with another checksum is another input: not up to date (the
    # version is published already, so the build then stops at that check, before any VM)
    site = repo.parent / "other-source.yaml"
    site.write_text("sources:\n  smoke:\n    disk: build/sources/smoke/smoke.qcow2\n"
                    "    checksum: sha256:" + "0" * 64 + "\n")
    other = build_py(repo, "smoke", "--site", str(site))
    assert "is up to date" not in other.stderr
    assert "builds: the inputs changed since build" in other.stderr, other.stderr
    assert other.returncode == 2 and "is already published" in other.stderr

    # a commit that does not touch smoke's inputs: a new version, the same image
    commit_change(repo, "README.md", "\nA line that does not change smoke.\n")
    proc, wall, vms = watched(repo, "smoke")
    assert proc.returncode == 0, proc.stderr
    assert f"smoke is up to date: reused build {version} (commit {commit[:7]}, " in proc.stderr
    assert "inputs hash" in proc.stderr and "smoke.qcow2" in proc.stderr
    assert "packer build" not in proc.stderr
    assert "ok check up to date" in proc.stderr and "failed" not in proc.stderr
    assert not vms
    assert wall < under_load(2), wall
    assert len(builds(repo)) == 1  # nothing recorded: the reused build is the record

    # release record takes the reused build
    done = build_py(repo, "release", "record", "1.0.0", "smoke")
    assert done.returncode == 0, done.stderr
    shown = json.loads(build_py(repo, "release", "show", "1.0.0", "--json").stdout)
    assert shown["images"]["smoke"]["version"] == version
    assert shown["images"]["smoke"]["git_commit"] == commit

    # --rebuild builds anyway: the version of this commit is not on the mirror yet
    git(repo, "commit", "-qam", "release 1.0.0")
    again, _, vms = watched(repo, "smoke", "--rebuild")
    assert again.returncode == 0, again.stderr
    assert "--rebuild" in again.stderr and "packer build" in again.stderr
    assert vms
    assert len(builds(repo)) == 2

    # --rebuild of a version already published still needs --replace
    refused = build_py(repo, "smoke", "--rebuild")
    assert refused.returncode == 2, refused.stderr
    assert "--replace" in refused.stderr


def test_changed_or_missing_inputs_build(repo: Path) -> None:
    old = builds(repo)[0]["custom_data"]

    # a changed file of images/smoke: built again, and the output says what changed
    commit_change(repo, "images/smoke/provision/marker.sh", "\n# changed\n")
    proc = build_py(repo, "smoke")
    assert proc.returncode == 0, proc.stderr
    assert f"builds: the inputs changed since build {old['version']}" in proc.stderr
    assert f"inputs hash {old['inputs_sha256'][:12]} then" in proc.stderr
    new = builds(repo)[-1]["custom_data"]
    assert len(builds(repo)) == 2 and new["inputs_sha256"] != old["inputs_sha256"]

    # its NAME.sha256 gone from the mirror: not up to date, says why, builds
    commit_change(repo, "README.md", "\nA line that does not change smoke.\n")
    (repo / "mirror" / new["mirror_path"] / "smoke.qcow2.sha256").unlink()
    proc = build_py(repo, "smoke")
    assert proc.returncode == 0, proc.stderr
    assert (f"has the same inputs, but {new['mirror_path']}/smoke.qcow2.sha256 is not on the "
            "mirror") in proc.stderr
    assert len(builds(repo)) == 3

    # a dirty tree (--skip-commit) is never up to date
    (repo / "README.md").write_text((repo / "README.md").read_text() + "dirty\n")
    proc = build_py(repo, "smoke", "--skip-commit")
    assert proc.returncode == 0, proc.stderr
    assert "a build from a dirty tree is never up to date" in proc.stderr
    assert len(builds(repo)) == 4


def test_up_to_date_on_an_ssh_mirror(repo: Path) -> None:
    """The files are checked over SFTP (stat and the .sha256) on a real sshd; the mirror is not
    an input: the build published to a local folder is the same image."""
    version = builds(repo)[0]["custom_data"]["version"]
    with SSHServer() as ssh, HTTPServer(ssh.root) as http:
        shutil.copytree(repo / "mirror" / "builds", ssh.root / "builds")
        site = repo.parent / "ssh-site.yaml"
        site.write_text(f"mirror:\n  url: {ssh.url}\n  http: {http.url}\n"
                        f"  identity_file: {ssh.client_key}\n  known_hosts: {ssh.known_hosts}\n")
        proc = build_py(repo, "smoke", "--site", str(site))
        assert proc.returncode == 0, proc.stderr
        assert f"smoke is up to date: reused build {version}" in proc.stderr
        # a .sha256 naming other bytes: not up to date (the version is published, so the
        # build then stops at that check, before any VM)
        checksum = ssh.root / "builds" / "smoke" / version / "smoke.qcow2.sha256"
        checksum.write_text("0" * 64 + "  smoke.qcow2\n")
        proc = build_py(repo, "smoke", "--site", str(site))
    assert "is up to date" not in proc.stderr
    assert (f"builds/smoke/{version}/smoke.qcow2.sha256 on the mirror does not name the "
            "recorded sha256") in proc.stderr
    assert proc.returncode == 2 and "is already published" in proc.stderr
    assert len(builds(repo)) == 1
