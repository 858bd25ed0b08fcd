"""`libvirt.driver: native` end to end: ./build.py smoke through a real libvirtd on a real NAT
network with DHCP, in the test's own network namespace (tests/netns_libvirt.py).

osimage uploads the source, boots an overlay on it in a tagged domain, finds the guest by its
DHCP lease, and Packer (a `null` source) provisions it over SSH; the overlay is downloaded and
flattened, hashed, published and recorded. The build runs under `ip netns exec`, as a user on
the hypervisor's network would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import git
from tests.netns_libvirt import NetnsLibvirt, netns_libvirt  # noqa: F401 - the fixture
from tests.test_build import read_marker

pytestmark = pytest.mark.vm


def native_site(repo: Path, env: NetnsLibvirt, uri: str | None = None,
                network: str | None = None, extra: str = "") -> Path:
    """The site of a native build on the namespaced hypervisor (driver left to its default)."""
    site = repo / "site.yaml"  # git-ignored
    site.write_text(f"""\
backend: libvirt
libvirt:
  uri: "{uri or env.uri}"
  pool: {env.pool}
  network: {network or env.network}
  domain_type: qemu
{extra}""")
    return site


def user_env() -> dict[str, str]:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    full_env.pop("OSIMAGE_ROOT", None)
    return full_env


def build_argv(repo: Path, *args: str) -> list[str]:
    return [sys.executable, str(repo / "build.py"), *args, "--site", str(repo / "site.yaml")]


def build_in_netns(env: NetnsLibvirt, repo: Path, *args: str, timeout: float = 300,
                   ssh_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(env.user_argv(build_argv(repo, *args), ssh_dir), cwd=repo,
                          timeout=timeout, env=user_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)


def leftovers(env: NetnsLibvirt) -> list[str]:
    """The build's domains and volumes: everything but the shared source volume and its
    stamp."""
    pool = env.conn.storagePoolLookupByName(env.pool)
    pool.refresh(0)
    return ([f"domain {d.name()}" for d in env.conn.listAllDomains(0)]
            + [f"volume {v.name()}" for v in pool.listAllVolumes(0)
               if not v.name().startswith("osimage-src-")])


def test_smoke_build_end_to_end(netns_env: NetnsLibvirt, repo: Path, tmp_path: Path) -> None:
    env = netns_env
    native_site(repo, env)
    commit = git(repo, "rev-parse", "HEAD").strip()
    version = f"g{commit[:10]}"
    t0 = time.monotonic()
    proc = build_in_netns(env, repo, "smoke")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    print(f"native libvirt smoke build: {elapsed:.1f} s")
    for step in ("connect to hypervisor", "upload source to pool", "render and validate HCL",
                 "boot build domain", "packer build", "download build disk",
                 "publish to mirror", "record in manifest.json"):
        assert f"ok {step} (" in proc.stderr, proc.stderr
    assert "(from lease)" in proc.stderr
    assert "stopped by its shutdown_command" in proc.stderr

    artifact = repo / "mirror" / "builds" / "smoke" / version / "smoke.qcow2"
    marker = read_marker(artifact, tmp_path)
    assert "osimage smoke marker" in marker and f"commit={commit}" in marker
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(artifact)],
                                     check=True, capture_output=True, text=True).stdout)
    assert "backing-filename" not in info and info["format"] == "qcow2"

    data = json.loads((repo / "images" / "smoke" / "manifest.json").read_text())
    [entry] = data["builds"]
    sha = subprocess.run(["sha256sum", str(artifact)], check=True, capture_output=True,
                         text=True).stdout.split()[0]
    assert entry["custom_data"]["sha256"]["smoke.qcow2"] == sha
    assert set(entry["custom_data"]["sha256"]) == {"smoke.qcow2", "smoke.packages.json",
                                                   "smoke.cdx.json"}  # issue 17
    assert entry["builder_type"] == "libvirt-native"
    assert leftovers(env) == []
    # the source volume stays, for the next build
    pool = env.conn.storagePoolLookupByName(env.pool)
    assert [v for v in pool.listAllVolumes(0) if v.name().startswith("osimage-src-smoke")]


def test_failing_provisioner_leaves_nothing(netns_env: NetnsLibvirt, repo: Path) -> None:
    env = netns_env
    native_site(repo, env)
    marker = repo / "images" / "smoke" / "provision" / "marker.sh"
    marker.write_text(marker.read_text() + "echo provisioning broke >&2; exit 7\n")
    git(repo, "commit", "-qam", "a provisioner that fails")
    proc = build_in_netns(env, repo, "smoke")
    assert proc.returncode == 1, proc.stderr
    assert "packer build failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(env) == []
    assert not (repo / "images" / "smoke" / "manifest.json").exists()


def test_render_needs_no_hypervisor_and_driver_is_checked(repo: Path) -> None:
    """./build.py render with driver native: a null source, the image's shutdown_command last;
    no hypervisor is reached. A misspelt driver is one line, exit 2."""
    from tests.conftest import build_py

    site = repo / "site.yaml"
    site.write_text('backend: libvirt\nlibvirt:\n  uri: "qemu:///system?socket=/nonexistent"\n'
                    '  pool: p\n  network: n\n  driver: native\n')
    proc = build_py(repo, "render", "smoke")
    assert proc.returncode == 0, proc.stderr
    hcl = (repo / proc.stdout.strip().splitlines()[-1]).read_text()
    assert 'source "null" "smoke"' in hcl and 'sources = ["source.null.smoke"]' in hcl
    assert hcl.rindex("zz-shutdown.sh") > hcl.rindex("marker.sh")
    site.write_text(site.read_text().replace("driver: native", "driver: nativ"))
    proc = build_py(repo, "render", "smoke")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: site.yaml: libvirt.driver: 'nativ' is not one of "
                                   "'plugin', 'native' (did you mean 'native'?)")
