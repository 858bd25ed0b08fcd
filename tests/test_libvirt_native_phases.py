"""The native libvirt driver stopped in each of its phases: nothing is left behind.

Each build runs on the test's namespaced hypervisor (tests/netns_libvirt.py) as a user on its
network would, in a process group of its own; the phase is read from the build's own output
lines (never guessed with a sleep) and the signal goes to the whole group, as a terminal sends
Ctrl-C. Whatever the phase and the signal (SIGINT, SIGTERM, SIGHUP): exit 130, one error
line, no domain, no volume of the build in the pool (the source volume stays, shared by
builds), no manifest.json, no qemu process. A build killed outright (SIGKILL) cannot clean up:
`./build.py clean` finds what it left by its tag.

The builds share the module's hypervisor and the uploaded source volume; each stops as early
as its phase allows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import build_py, git
from tests.netns_libvirt import NetnsLibvirt, netns_libvirt  # noqa: F401 - the fixture
from tests.test_libvirt_native_build import (
    build_argv,
    build_in_netns,
    leftovers,
    native_site,
    user_env,
)

pytestmark = pytest.mark.vm

DEFINED = "defined"
BOOTING = "waiting for its address"
PROVISIONING = "Provisioning with shell script"
DOWNLOADING = "    downloading "


@pytest.fixture(scope="module")
def no_dhcp_network(netns_env: NetnsLibvirt) -> str:
    return netns_env.add_network(dhcp=False)


def slow_provisioner(repo: Path, script: str) -> None:
    marker = repo / "images" / "smoke" / "provision" / "marker.sh"
    marker.write_text(marker.read_text() + script)
    git(repo, "commit", "-qam", "a provisioner that takes its time")


def stopped_at(env: NetnsLibvirt, repo: Path, seen: Callable[[str], bool], sig: int,
               *args: str) -> tuple[int, str, float]:
    """Run the build, send sig to its process group once a line of its output matches;
    its exit status, its output and how long it took to stop after the signal."""
    proc = subprocess.Popen(env.user_argv(build_argv(repo, "smoke", *args)), cwd=repo,
                            env=user_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if seen(line):
                break
        else:
            pytest.fail("the build ended before the phase: " + "".join(lines))
        os.killpg(proc.pid, sig)
        t0 = time.monotonic()
        _out, err = proc.communicate(timeout=90)
        return proc.returncode, "".join(lines) + err, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_nothing_left(env: NetnsLibvirt, repo: Path) -> None:
    assert leftovers(env) == []
    assert env.qemu_pids() == []
    assert not (repo / "images" / "smoke" / "manifest.json").exists()
    assert not (repo / "mirror" / "builds").exists() or not any(
        (repo / "mirror" / "builds").rglob("*.qcow2"))


def assert_interrupted(code: int, out: str, step: str, signame: str) -> None:
    assert code == 130, out
    assert f"failed {step} (" in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: interrupted by {signame}; the build was stopped and cleaned up"], \
        out
    assert "Traceback" not in out


@pytest.mark.parametrize(("phase", "step", "sig"), [
    (DEFINED, "boot build domain", signal.SIGINT),
    (BOOTING, "boot build domain", signal.SIGINT),
    (BOOTING, "boot build domain", signal.SIGHUP),
])
def test_stopped_while_the_domain_starts(netns_env: NetnsLibvirt, repo: Path, phase: str,
                                         step: str, sig: signal.Signals) -> None:
    native_site(repo, netns_env)
    code, out, took = stopped_at(netns_env, repo, lambda line: phase in line
                                 and "domain packer-osimage-smoke-" in line, sig)
    print(f"{phase}, {sig.name}: stopped in {took:.1f} s")
    assert_interrupted(code, out, step, sig.name)
    assert_nothing_left(netns_env, repo)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopped_while_provisioning(netns_env: NetnsLibvirt, repo: Path,
                                    sig: signal.Signals) -> None:
    native_site(repo, netns_env)
    slow_provisioner(repo, "echo provisioning; sleep 300\n")
    code, out, took = stopped_at(netns_env, repo, lambda line: PROVISIONING in line
                                 and "marker.sh" in line, sig)
    print(f"provisioning, {sig.name}: stopped in {took:.1f} s")
    assert_interrupted(code, out, "packer build", sig.name)
    assert_nothing_left(netns_env, repo)


def test_stopped_while_downloading(netns_env: NetnsLibvirt, repo: Path) -> None:
    """The guest writes 400 MiB, so the overlay's download lasts long enough to be
    interrupted: the stream is aborted, the partial download and the overlay removed."""
    native_site(repo, netns_env)
    image = repo / "images" / "smoke" / "image.yaml"
    image.write_text(image.read_text().replace("disk_size: 128M", "disk_size: 1G"))
    slow_provisioner(repo, "dd if=/dev/zero of=/dev/vda bs=1M seek=200 count=400 "
                           "conv=fsync 2>&1\n")
    code, out, took = stopped_at(netns_env, repo, lambda line: line.startswith(DOWNLOADING),
                                 signal.SIGINT)
    print(f"downloading, SIGINT: stopped in {took:.1f} s")
    assert_interrupted(code, out, "download build disk", "SIGINT")
    # stopped in the stream itself: the download's summary line never came
    assert not re.search(r"-disk\.qcow2: \S+ \S* ?in [\d.]+ s \(", out), out
    assert_nothing_left(netns_env, repo)
    assert not list((repo / "build" / "smoke").glob("*/.overlay-*"))


def test_guest_without_an_address(netns_env: NetnsLibvirt, no_dhcp_network: str,
                                  repo: Path) -> None:
    """A network that serves no DHCP: one error line once libvirt.address_timeout is up."""
    native_site(repo, netns_env, network=no_dhcp_network, extra="  address_timeout: 4\n")
    t0 = time.monotonic()
    proc = build_in_netns(netns_env, repo, "smoke", timeout=120)
    print(f"no address: failed after {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: domain packer-osimage-smoke-") and errors[0].endswith(
        ": no IPv4 address from its network's DHCP leases within 4 s"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_left(netns_env, repo)


@pytest.fixture
def unrelated(netns_env: NetnsLibvirt) -> Iterator[tuple[str, str]]:
    """A domain and a volume named like a build's, made by someone else (no tag, no record)."""
    name = "packer-osimage-smoke-0000beef"
    pool = netns_env.conn.storagePoolLookupByName(netns_env.pool)
    vol = pool.createXML(f"<volume><name>{name}-disk.qcow2</name><capacity>1048576</capacity>"
                         f"<target><format type='qcow2'/></target></volume>", 0)
    dom = netns_env.conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source pool='{netns_env.pool}' volume='{name}-disk.qcow2'/>"
        f"<target dev='vda' bus='virtio'/></disk></devices></domain>")
    yield name, f"{name}-disk.qcow2"
    dom.undefine()
    vol.delete(0)


def test_clean_finds_a_killed_builds_leftovers_by_their_tag(
        netns_env: NetnsLibvirt, repo: Path, unrelated: tuple[str, str]) -> None:
    env = netns_env
    native_site(repo, env)
    proc = subprocess.Popen(env.user_argv(build_argv(repo, "smoke")), cwd=repo, env=user_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if BOOTING in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # no cleanup of its own
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    left = leftovers(env)
    build_domain = next(x.split()[1] for x in left if x.startswith("domain packer-osimage-smoke")
                        and unrelated[0] not in x)
    assert f"volume {build_domain}-disk.qcow2" in left
    assert any(x.startswith("volume osimage-build-") for x in left)

    listing = build_py(repo, "clean", "--uri", env.uri, "--older-than", "0")
    assert listing.returncode == 0, listing.stderr
    assert build_domain in listing.stdout and f"{build_domain}-disk.qcow2" in listing.stdout
    assert unrelated[0] + " " not in listing.stdout and unrelated[1] not in listing.stdout
    removed = build_py(repo, "clean", "--uri", env.uri, "--older-than", "0", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "removed 2 of 2" in removed.stdout, removed.stdout
    assert sorted(leftovers(env)) == [f"domain {unrelated[0]}", f"volume {unrelated[1]}"]
    assert env.qemu_pids() == []
    pool = env.conn.storagePoolLookupByName(env.pool)
    assert [v for v in pool.listAllVolumes(0) if v.name().startswith("osimage-src-smoke")]
