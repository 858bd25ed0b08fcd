"""A real build published to a real SSH mirror (sshd + HTTP on 127.0.0.1), and the failures
a release engineer meets: the mirror down, its host key unknown. No manifest changes then."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import build_py, git
from tests.servers import HTTPServer, SSHServer


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


def site_file(repo: Path, ssh: SSHServer, http_url: str, known_hosts: Path) -> Path:
    path = repo.parent / "site.yaml"
    path.write_text(f"mirror:\n  url: {ssh.url}\n  http: {http_url}\n"
                    f"  identity_file: {ssh.client_key}\n  known_hosts: {known_hosts}\n")
    return path


@pytest.mark.vm
def test_build_publishes_to_ssh_mirror(repo: Path, ssh: SSHServer) -> None:
    with HTTPServer(ssh.root) as http:
        site = site_file(repo, ssh, http.url, ssh.known_hosts)
        proc = build_py(repo, "smoke", "--release", "7.0.0", "--site", str(site))
        assert proc.returncode == 0, proc.stderr
        assert "ok check mirror" in proc.stderr
    published = ssh.root / "builds/smoke/7.0.0"
    assert sorted(p.name for p in published.iterdir()) == [  # the disk, package list, SBOM
        "smoke.cdx.json", "smoke.cdx.json.sha256", "smoke.packages.json",
        "smoke.packages.json.sha256", "smoke.qcow2", "smoke.qcow2.sha256"]
    entry = json.loads((repo / "images/smoke/manifest.json").read_text())["builds"][0]
    sha = (published / "smoke.qcow2.sha256").read_text().split()[0]
    assert entry["custom_data"]["sha256"]["smoke.qcow2"] == sha
    assert not (repo / "mirror").exists()
    assert git(repo, "status", "--porcelain").strip() in ("", "?? images/smoke/manifest.json")


def test_unreachable_mirror_fails_before_the_vm(repo: Path, ssh: SSHServer) -> None:
    ssh.stop()
    site = site_file(repo, ssh, "http://127.0.0.1:9/", ssh.known_hosts)
    proc = build_py(repo, "smoke", "--site", str(site))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "127.0.0.1" in errors[0]
    assert "packer build" not in proc.stderr
    assert not (repo / "images/smoke/manifest.json").exists()


def test_unknown_host_key_fails_before_the_vm(repo: Path, ssh: SSHServer) -> None:
    empty = repo.parent / "known_hosts"
    empty.write_text("")
    site = site_file(repo, ssh, "http://127.0.0.1:9/", empty)
    proc = build_py(repo, "smoke", "--site", str(site))
    assert proc.returncode == 1
    assert "SHA256:" in proc.stderr and "--accept-new-host-key" in proc.stderr
    assert "packer build" not in proc.stderr
    assert not (repo / "images/smoke/manifest.json").exists()
