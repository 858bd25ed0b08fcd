"""The 'check mirror' and 'check registry' steps find what would make a publish fail, before the
VM starts: a mirror that is not writable or has no room, an HTTP side that does not serve what
SSH wrote or is down, a registry that is down or refuses the credentials; a mirror URL of an
unknown scheme or a local mirror folder that does not exist is refused with the configuration.

Real sshd, http.server and docker-registry on 127.0.0.1; the real ./build.py of a test clone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osimage.errors import BuildError
from tests.conftest import build_py, git, qemu_pids, tree_snapshot, under_load
from tests.registry import Registry
from tests.servers import HTTPServer, SSHServer, free_port

needs_sshd = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                                reason="needs OpenSSH's sshd (apt-get install openssh-server)")
needs_registry = pytest.mark.skipif(not Registry.available(), reason="docker-registry is not "
                                    "installed (scripts/setup.sh installs it)")
MiB = 1 << 20
PREFLIGHT_SECONDS = 30  # far below a VM boot under TCG


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line the user saw; never a Python traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def failed_before_the_vm(repo: Path, proc: subprocess.CompletedProcess[str],
                         seconds: float) -> str:
    """Exit 1 with one error line, no Packer step started, no qemu, nothing recorded."""
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert "packer build" not in proc.stderr and "make build key" not in proc.stderr
    assert not qemu_pids(repo)
    assert seconds < under_load(PREFLIGHT_SECONDS)
    assert not (repo / "images/smoke/manifest.json").exists()
    return line


def build(repo: Path, *args: str, env: dict[str, str] | None = None
          ) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = build_py(repo, "smoke", *args, env=env)
    return proc, time.monotonic() - t0


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


def ssh_site(repo: Path, ssh: SSHServer, http_url: str) -> Path:
    path = repo.parent / "site.yaml"
    path.write_text(f"mirror:\n  url: {ssh.url}\n  http: {http_url}\n"
                    f"  identity_file: {ssh.client_key}\n  known_hosts: {ssh.known_hosts}\n")
    return path


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount: {proc.stderr.strip()}")


# --- the SSH mirror and its HTTP side ------------------------------------------------------------


@needs_sshd
def test_mirror_root_on_a_read_only_disk(repo: Path, ssh: SSHServer) -> None:
    mount("-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(ssh.root))
    try:
        with HTTPServer(ssh.root) as http:
            proc, seconds = build(repo, "--site", str(ssh_site(repo, ssh, http.url)))
    finally:
        subprocess.run(["umount", str(ssh.root)], check=True)
    line = failed_before_the_vm(repo, proc, seconds)
    assert f"cannot write to {ssh.root}: read-only file system" in line


@needs_sshd
def test_mirror_root_not_writable_by_the_ssh_user(repo: Path, ssh: SSHServer) -> None:
    # sshd runs as root here: only an immutable folder refuses root a write
    if subprocess.run(["chattr", "+i", str(ssh.root)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        with HTTPServer(ssh.root) as http:
            proc, seconds = build(repo, "--site", str(ssh_site(repo, ssh, http.url)))
    finally:
        subprocess.run(["chattr", "-i", str(ssh.root)], check=True)
    line = failed_before_the_vm(repo, proc, seconds)
    assert f"cannot write to {ssh.root}: permission denied" in line
    assert os.listdir(ssh.root) == []


@needs_sshd
def test_no_room_on_the_mirror_for_the_expected_size(repo: Path, ssh: SSHServer) -> None:
    source = repo / "build/sources/smoke/smoke.qcow2"
    assert source.stat().st_size > 8 * MiB
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(ssh.root))
    try:
        with HTTPServer(ssh.root) as http:
            site = ssh_site(repo, ssh, http.url)
            proc, seconds = build(repo, "--site", str(site))
            line = failed_before_the_vm(repo, proc, seconds)
            needed = f"{source.stat().st_size / MiB:.1f} MiB"
            assert line.startswith("error: mirror disk full: builds/smoke/g")
            assert f"needs about {needed} (the size of the source), 127.0.0.1:{ssh.root} has " \
                   in line
            # a recorded build is the better guess (manifest.json is output: the tree stays clean)
            last = {"name": "smoke", "files": [{"name": "smoke.qcow2", "size": 30 * MiB}]}
            manifest = repo / "images/smoke/manifest.json"
            manifest.write_text(json.dumps({"builds": [last], "last_run_uuid": "x"}))
            proc, seconds = build(repo, "--site", str(site))
            manifest.unlink()
            line = failed_before_the_vm(repo, proc, seconds)
            assert "needs about 30.0 MiB (the size of its last build)" in line
        left = os.listdir(ssh.root)
    finally:
        subprocess.run(["umount", str(ssh.root)], check=True)
    assert left == []


@needs_sshd
def test_http_serving_another_folder_than_the_ssh_root(repo: Path, ssh: SSHServer,
                                                        tmp_path: Path) -> None:
    other = tmp_path / "www"
    other.mkdir()
    with HTTPServer(other) as http:
        proc, seconds = build(repo, "--site", str(ssh_site(repo, ssh, http.url)))
    line = failed_before_the_vm(repo, proc, seconds)
    assert f"mirror.http {http.url} does not serve the mirror root" in line
    assert "(404)" in line
    assert os.listdir(ssh.root) == [] and os.listdir(other) == []  # the probe was removed


@needs_sshd
def test_http_side_down(repo: Path, ssh: SSHServer) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc, seconds = build(repo, "--site", str(ssh_site(repo, ssh, url)))
    line = failed_before_the_vm(repo, proc, seconds)
    assert line == f"error: mirror.http {url}: connection refused"
    assert os.listdir(ssh.root) == []


@needs_sshd
def test_a_good_mirror_passes_and_says_what_it_found(ssh: SSHServer, tmp_path: Path) -> None:
    from osimage.publish import mirrorcheck
    from osimage.publish.sshmirror import SSHMirror

    with HTTPServer(ssh.root) as http:
        m = SSHMirror(ssh.url, http.url, identity_file=ssh.client_key,
                      known_hosts=ssh.known_hosts)
        found = mirrorcheck.check(m, "builds/smoke/1.0", mirrorcheck.Expected(20 * MiB, "x"))
    assert f"writable by {ssh.user}" in found and f"served by {http.url}" in found
    assert os.listdir(ssh.root) == []


# --- a local mirror folder ---------------------------------------------------------------------


def test_local_mirror_checks(tmp_path: Path) -> None:
    from osimage.publish import mirrorcheck
    from osimage.publish.mirror import LocalMirror

    root = tmp_path / "mirror"
    small, big = mirrorcheck.Expected(MiB, "small"), mirrorcheck.Expected(20 * MiB, "a guess")
    found = mirrorcheck.check(LocalMirror(root), "builds/smoke/1.0", small)  # made on first use
    assert "writable" in found and not root.exists()
    root.mkdir()
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root))
    try:
        with pytest.raises(BuildError, match=r"mirror disk full: builds/smoke/1.0 needs about "
                                             r"20.0 MiB \(a guess\)"):
            mirrorcheck.check(LocalMirror(root), "builds/smoke/1.0", big)
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with pytest.raises(BuildError, match=r"cannot write to .*: read-only file system"):
            mirrorcheck.check(LocalMirror(root), "builds/smoke/1.0", small)
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_local_mirror_not_writable_fails_before_the_vm(repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    (repo / "site.yaml").write_text(f"mirror:\n  url: {root}\n")  # git-ignored
    mount("-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(root))
    try:
        proc, seconds = build(repo)
    finally:
        subprocess.run(["umount", str(root)], check=True)
    line = failed_before_the_vm(repo, proc, seconds)
    assert f"local mirror {root}: cannot write to {root}: read-only file system" in line


# --- the registry of the OCI export ------------------------------------------------------------


def with_oci_export(repo: Path, registry_host: str) -> None:
    """The smoke image with an OCI export, committed; site.yaml (git-ignored) names the
    registry."""
    image_yaml = repo / "images/smoke/image.yaml"
    image_yaml.write_text(image_yaml.read_text() +
                          "  rootfs:\n    script: diskless/rootfs.sh\n  oci: {}\n")
    git(repo, "commit", "-qam", "smoke: an OCI export")
    (repo / "site.yaml").write_text(f"registry:\n  url: {registry_host}/osimage\n"
                                    "  tls_verify: false\n")


@needs_registry
def test_registry_down(repo: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    with_oci_export(repo, host)
    proc, seconds = build(repo)
    line = failed_before_the_vm(repo, proc, seconds)
    assert line == f"error: registry {host}: connection refused"


@needs_registry
def test_registry_refuses_the_credentials(repo: Path) -> None:
    with Registry(login=("builder", "right-s3cret")) as registry:
        with_oci_export(repo, registry.host)
        proc, seconds = build(repo, env={"OSIMAGE_REGISTRY_USERNAME": "builder",
                                         "OSIMAGE_REGISTRY_PASSWORD": "wrong-s3cret"})
        line = failed_before_the_vm(repo, proc, seconds)
        assert f"registry {registry.host} refused the credentials of 'builder'" in line
        assert "s3cret" not in proc.stderr + proc.stdout

        proc, seconds = build(repo)
        line = failed_before_the_vm(repo, proc, seconds)
        assert f"registry {registry.host} wants a login and no credentials" in line


@needs_registry
def test_registry_check_takes_good_credentials(tmp_path: Path) -> None:
    from osimage.features import ociregistry as registrycheck

    auth = tmp_path / "auth.json"
    with Registry(login=("builder", "right-s3cret")) as registry:
        import base64
        import json

        token = base64.b64encode(b"builder:right-s3cret").decode()
        auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
        login = registrycheck.credentials(registry.host, auth)
        assert login == ("builder", "right-s3cret")
        assert "takes the credentials of 'builder'" in registrycheck.check(
            registry.host, False, login)
    with Registry() as registry:
        assert registrycheck.check(registry.host, False, None) == "answers, no login needed"


# --- refused with the configuration: exit 2, nothing written -----------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("ftp://mirror.example/osimage",
     "error: site.yaml: mirror.url: unknown scheme 'ftp' (use a folder path, file:// or ssh://)"),
    ("{missing}", "error: site.yaml: mirror.url: the mirror folder {missing} does not exist"),
    ("file://{missing}", "error: site.yaml: mirror.url: the mirror folder {missing} does not "
                         "exist"),
])
def test_mirror_url_refused_at_configuration_time(repo: Path, tmp_path: Path, url: str,
                                                  expected: str) -> None:
    missing = tmp_path / "no-such-mirror"  # the old code made it; under tmp_path that is harmless
    url, expected = url.format(missing=missing), expected.format(missing=missing)
    (repo / "site.yaml").write_text(f"mirror:\n  url: {url}\n  http: http://127.0.0.1:9/\n")
    before = tree_snapshot(repo)
    proc, _ = build(repo)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc) == expected
    assert "==> " not in proc.stderr  # no step started
    assert tree_snapshot(repo) == before
    assert not (repo / "build/smoke").exists() and not missing.exists()
