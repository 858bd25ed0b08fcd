"""images/debian-base: a real Debian 12 made by mmdebstrap, built end to end with the qemu backend.

The source disk is made once per session by scripts/make-debian-base-disk.sh (mmdebstrap needs
the Debian mirror; its .debs are cached under ~/.cache/osimage). Files are read back out of
the disks without mounting: qemu-img convert to raw, then debugfs at the root partition.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from osimage.release.versions import deb_version
from tests.conftest import build_py, git, make_debian_base_source

# mmdebstrap (1-4 minutes, by the machine's load) and a systemd boot under TCG outlast the
# suite's default timeout.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

ROOT_OFFSET = 134217728  # p2, the root file system (scripts/make-debian-base-disk.sh)
DISK = "debian-base.qcow2"


class RootFs:
    """The root file system of a debian-base disk, read with debugfs."""

    def __init__(self, raw: Path) -> None:
        self.spec = f"{raw}?offset={ROOT_OFFSET}"

    def run(self, request: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["debugfs", "-R", request, self.spec], capture_output=True,
                              text=True, check=True)

    def cat(self, path: str) -> str:
        return self.run(f"cat {path}").stdout

    def exists(self, path: str) -> bool:
        return "not found" not in self.run(f"stat {path}").stderr

    def names(self, directory: str) -> list[str]:
        return self.run(f"ls {directory}").stdout.split()


Opener = Callable[[Path], "RootFs"]


@pytest.fixture
def open_disk(tmp_path: Path) -> Iterator[Opener]:
    made: list[Path] = []

    def opener(disk: Path) -> RootFs:
        raw = tmp_path / f"{disk.stem}-{len(made)}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
        made.append(raw)
        return RootFs(raw)

    yield opener
    for raw in made:
        raw.unlink(missing_ok=True)


def assert_no_secrets(fs: RootFs) -> None:
    """No key of anyone: root's keys come from fw_cfg at boot, host keys at first boot."""
    assert not fs.exists("/root/.ssh/authorized_keys")
    assert not [n for n in fs.names("/etc/ssh") if n.startswith("ssh_host_")]
    assert fs.cat("/etc/machine-id").strip() in ("", "uninitialized")


def test_source_disk_holds_no_keys(debian_base_sources: Path, open_disk: Opener) -> None:
    fs = open_disk(debian_base_sources / DISK)
    assert_no_secrets(fs)
    assert "bookworm" in fs.cat("/usr/lib/os-release")  # /etc/os-release links to it
    assert "/run/osimage/authorized_keys" in fs.cat("/etc/ssh/sshd_config.d/osimage.conf")
    assert fs.exists("/etc/systemd/system/multi-user.target.wants/osimage-authorized-keys.service")
    check = subprocess.run(["sha256sum", "-c", f"{DISK}.sha256"], cwd=debian_base_sources,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_source_disk_is_reproducible(debian_base_sources: Path, tmp_path: Path) -> None:
    """Made again with the same SOURCE_DATE_EPOCH (and mirror state): the same bytes."""
    again = tmp_path / "again"
    make_debian_base_source(again)
    assert (again / f"{DISK}.sha256").read_text() == \
        (debian_base_sources / f"{DISK}.sha256").read_text()


def test_build_debian_base_end_to_end(debian_repo: Path, open_disk: Opener) -> None:
    repo = debian_repo
    commit = git(repo, "rev-parse", "HEAD").strip()
    version = f"g{commit[:10]}"
    t0 = time.monotonic()
    proc = build_py(repo, "debian-base", timeout=1500)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"debian-base build: {elapsed:.0f} s")
    assert "Connected to SSH!" in proc.stderr
    assert "making debian-base.qcow2" not in proc.stderr  # the stamp said it was made

    published = repo / "mirror" / "builds" / "debian-base" / version
    artifact = published / DISK
    check = subprocess.run(["sha256sum", "-c", f"{DISK}.sha256"], cwd=published,
                           capture_output=True, text=True)
    assert check.returncode == 0 and f"{DISK}: OK" in check.stdout

    fs = open_disk(artifact)
    marker = fs.cat("/var/lib/osimage/marker")
    assert "osimage debian-base marker" in marker
    assert f"version={version}" in marker and f"commit={commit}" in marker
    assert "pid1=/usr/lib/systemd/systemd" in marker.splitlines()
    packages = dict(line.split("\t", 1) for line in
                    fs.cat("/var/lib/osimage/packages.txt").splitlines() if "\t" in line)
    assert packages.get("openssh-server", "").startswith("1:9.2")
    assert "systemd-sysv" in packages
    # the build's package list (issue 17) is dpkg-query's in the guest, package for package
    listed = json.loads((published / "debian-base.packages.json").read_text())
    assert listed["manager"] == "dpkg" and listed["os"] == {"id": "debian", "version_id": "12"}
    assert {p["name"]: deb_version(p["epoch"], p["version"], p["release"])
            for p in listed["packages"]} == {n.split(":")[0]: v for n, v in packages.items()}
    assert any(p["licenses"] for p in listed["packages"])  # machine-readable copyright files
    # the build's own key and the host keys of its boot did not ship
    assert_no_secrets(fs)
    # its exports (debian-compute's OCI image is layered on them), the tar made in a tmpfs:
    # not shipped inside the disk
    exports = ["debian-base-rootfs.tar", "debian-base-oci.tar"]
    check = subprocess.run(["sha256sum", "-c", *(f"{n}.sha256" for n in exports)],
                           cwd=published, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not fs.exists("/var/tmp/osimage-rootfs.tar")
