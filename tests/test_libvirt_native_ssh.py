"""The native libvirt driver through `qemu+ssh://`, as production reaches its hypervisor.

The hypervisor is the test's namespaced libvirtd (tests/netns_libvirt.py) with an OpenSSH sshd
in its network and mount namespaces (HypervisorSSHD): libvirt's own ssh logs in to it with
the URI's key and checks its host key against known_hosts (root's ~/.ssh, a folder of the
test's bind-mounted for the build only). The guest's NAT network is not routable from the
build's side in production, so Packer reaches the guest through that sshd as SSH bastion.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.conftest import git
from tests.netns_libvirt import HypervisorSSHD, NetnsLibvirt, netns_libvirt  # noqa: F401
from tests.test_build import read_marker
from tests.test_libvirt_native_build import build_argv, build_in_netns, leftovers, native_site

pytestmark = pytest.mark.vm

LOGIN = re.compile(r"ssh -i \S+ [^\r\n]*root@(10\.\d+\.\d+\.\d+)")
PAUSE = "Press enter to continue"


@pytest.fixture(scope="module")
def hypervisor(netns_env: NetnsLibvirt) -> Iterator[HypervisorSSHD]:
    with HypervisorSSHD(netns_env) as sshd:
        yield sshd


def test_smoke_through_qemu_ssh_with_the_hypervisor_as_bastion(
        netns_env: NetnsLibvirt, hypervisor: HypervisorSSHD, repo: Path, tmp_path: Path) -> None:
    env = netns_env
    native_site(repo, env, uri=hypervisor.uri())
    commit = git(repo, "rev-parse", "HEAD").strip()
    version = f"g{commit[:10]}"
    t0 = time.monotonic()
    proc = build_in_netns(env, repo, "smoke", ssh_dir=hypervisor.workdir)
    print(f"native smoke build through qemu+ssh://: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr
    assert f"through root@127.0.0.1 port {hypervisor.port})" in proc.stderr, proc.stderr
    # Packer's SSH went through the hypervisor's sshd, to the guest's address
    m = re.search(r"guest address (\S+) ", proc.stderr)
    assert m is not None
    assert f"target {m.group(1)} port 22" in hypervisor.log.read_text(errors="replace")
    hcl = (repo / "build" / "smoke" / version / "smoke.pkr.hcl").read_text()
    assert 'ssh_bastion_host     = "127.0.0.1"' in hcl
    assert f'ssh_bastion_private_key_file = "{hypervisor.client_key}"' in hcl
    assert "PRIVATE KEY" not in hcl + proc.stderr + proc.stdout  # paths, never the keys

    artifact = repo / "mirror" / "builds" / "smoke" / version / "smoke.qcow2"
    marker = read_marker(artifact, tmp_path)
    assert "osimage smoke marker" in marker and f"commit={commit}" in marker
    [entry] = json.loads((repo / "images" / "smoke" / "manifest.json").read_text())["builds"]
    sha = subprocess.run(["sha256sum", str(artifact)], check=True, capture_output=True,
                         text=True).stdout.split()[0]
    assert entry["custom_data"]["sha256"]["smoke.qcow2"] == sha
    assert leftovers(env) == []
    assert env.qemu_pids() == []


def test_unknown_hypervisor_host_key_is_refused(netns_env: NetnsLibvirt,
                                                hypervisor: HypervisorSSHD, repo: Path,
                                                tmp_path: Path) -> None:
    """known_hosts without the hypervisor's key: one error line, exit 1, nothing made."""
    empty = tmp_path / "ssh"
    empty.mkdir(mode=0o700)
    native_site(repo, netns_env, uri=hypervisor.uri())
    proc = build_in_netns(netns_env, repo, "smoke", ssh_dir=empty, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "127.0.0.1" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(netns_env) == []


def test_debug_login_line_reaches_the_guest_through_the_bastion(
        netns_env: NetnsLibvirt, hypervisor: HypervisorSSHD, repo: Path) -> None:
    """--debug prints how to log in: the guest's address through the hypervisor; it works."""
    env = netns_env
    native_site(repo, env, uri=hypervisor.uri())
    argv = env.user_argv(build_argv(repo, "smoke", "--debug"), hypervisor.workdir)
    child = pexpect.spawn(argv[0], argv[1:], cwd=str(repo), encoding="utf-8", timeout=120,
                          dimensions=(50, 250),
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                               "HOME": str(Path.home()), "TERM": "xterm"})
    login: list[str] | None = None
    hostname = ""
    try:
        while True:
            i = child.expect([PAUSE, LOGIN, pexpect.EOF])
            if i == 0:
                child.send("\r")
            elif i == 1:
                m = child.match
                assert isinstance(m, re.Match)
                login = shlex.split(m.group(0))
                hostname = _log_in(env, hypervisor, login)
            else:
                break
    finally:
        child.close(force=True)
    assert login is not None, child.before
    assert any(a.startswith("ProxyCommand=") and f"-p {hypervisor.port}" in a for a in login)
    assert hostname == "smoke"
    assert child.exitstatus == 0, child.before
    assert leftovers(env) == []
    assert not (repo / "images" / "smoke" / "manifest.json").exists()


def _log_in(env: NetnsLibvirt, hypervisor: HypervisorSSHD, login: list[str]) -> str:
    """Run the printed command as the person would (same network, same ~/.ssh)."""
    argv = [*login[:-1], "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", login[-1],
            "cat /etc/hostname"]
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(env.user_argv(argv, hypervisor.workdir), capture_output=True,
                             text=True, timeout=60, check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()
        time.sleep(1)
