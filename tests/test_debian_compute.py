"""images/debian-compute: a layer on debian-base (parent:), built end to end with the qemu backend:
debian-base, then debian-compute from its published disk; the compute artifact holds the
compute packages (dpkg's status) and the base's files; a change to debian-compute alone makes
only it build (`plan` says which file); nothing changed, both are up to date in under a second;
the child's OCI image shares the parent's layer in a real registry (when debian-base exports
one). One module-scoped repository: the base and the compute layer are built once.

Time under TCG on a shared 2-core machine (measured 2026-11-26): debian-base 52-210 s by load,
then debian-compute 362-550 s, the Ansible package install in the VM 4.5-5 minutes of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import PROJECT, build_py, git, make_repo
from tests.registry import Registry
from tests.test_debian_base import ROOT_OFFSET, RootFs

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

COMPUTE = PROJECT / "images" / "debian-compute"
PACKAGES = ("slurmd", "slurm-client", "munge", "nfs-common", "chrony", "ethtool", "iperf3",
            "iproute2", "bash-completion", "vim")


def latest(repo: Path, image: str) -> dict[str, Any]:
    builds = json.loads((repo / "images" / image / "manifest.json").read_text())["builds"]
    return dict(builds[-1])


def read_disk(disk: Path, tmp: Path) -> RootFs:
    raw = tmp / f"{disk.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    return RootFs(raw)


def dpkg_installed(fs: RootFs) -> set[str]:
    """Packages dpkg's status file marks 'install ok installed'."""
    installed: set[str] = set()
    for stanza in fs.cat("/var/lib/dpkg/status").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line
                      and not line.startswith(" "))
        if fields.get("Status") == "install ok installed":
            installed.add(fields["Package"])
    return installed


def test_compute_playbook_passes_ansible_lint(tmp_path: Path) -> None:
    if shutil.which("ansible-lint") is None:
        pytest.skip("ansible-lint is not installed (scripts/setup.sh installs it)")
    shutil.copytree(COMPUTE / "ansible", tmp_path / "ansible")
    proc = subprocess.run(["ansible-lint", "--offline", "--nocolor", "ansible"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = YAML(typ="safe").load((COMPUTE / "ansible/vars/packages.yml").read_text())
    assert sorted(p for names in data["node_packages"].values() for p in names) == \
        sorted(PACKAGES)


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory, debian_base_sources: Path) -> Path:
    """A repository where debian-base and then debian-compute were built and published."""
    repo = make_repo(tmp_path_factory.mktemp("layers") / "repo")
    sources = repo / "build" / "sources" / "debian-base"
    shutil.copytree(debian_base_sources, sources)
    script = repo / "scripts" / "make-debian-base-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    for image in ("debian-base", "debian-compute"):
        t0 = time.monotonic()
        proc = build_py(repo, image, timeout=2000)
        assert proc.returncode == 0, proc.stderr[-5000:]
        print(f"{image} build: {time.monotonic() - t0:.0f} s")
    return repo


def test_compute_artifact_has_its_packages_and_the_base(layered: Path,
                                                        tmp_path: Path) -> None:
    base, compute = latest(layered, "debian-base"), latest(layered, "debian-compute")
    base_file = f"{base['custom_data']['mirror_path']}/debian-base.qcow2"
    assert compute["custom_data"]["parent"]["file"] == base_file
    assert compute["custom_data"]["parent"]["sha256"] == \
        base["custom_data"]["sha256"]["debian-base.qcow2"]
    disk = layered / "mirror" / compute["custom_data"]["mirror_path"] / "debian-compute.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)],
                                     check=True, capture_output=True, text=True).stdout)
    assert "backing-filename" not in info  # flattened: a node needs nothing else
    fs = read_disk(disk, tmp_path)
    installed = dpkg_installed(fs)
    assert set(PACKAGES) <= installed, set(PACKAGES) - installed
    # the base's files: its marker (written by debian-base's build), its key hand-over
    assert "image=debian-base" in fs.cat("/var/lib/osimage/marker")
    assert fs.exists("/etc/systemd/system/multi-user.target.wants/osimage-authorized-keys.service")
    assert {"openssh-server", "systemd-sysv"} <= installed
    listed = fs.cat("/etc/osimage/node-packages.txt").splitlines()
    assert listed[0].startswith("# debian-compute g") and sorted(listed[1:]) == sorted(PACKAGES)
    assert fs.exists("/etc/systemd/system/multi-user.target.wants/munge.service")
    # generic: no build-made munge key, host keys, apt lists or machine id
    assert not fs.exists("/etc/munge/munge.key")
    assert not [n for n in fs.names("/etc/ssh") if n.startswith("ssh_host_")]
    # debugfs ls shows "INODE (RECLEN) NAME": only . and .. are left
    lists = fs.names("/var/lib/apt/lists")
    assert not [n for n in lists if n not in (".", "..") and not n[0].isdigit()
                and not n.startswith("(")], lists
    assert fs.cat("/etc/machine-id").strip() == "uninitialized"
    assert f"offset={ROOT_OFFSET}" in fs.spec


def test_unchanged_both_are_up_to_date_in_under_a_second(layered: Path) -> None:
    t0 = time.monotonic()
    proc = build_py(layered, "plan", "debian-compute")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("up to date (build") == 2, out
    for image in ("debian-base", "debian-compute"):
        t0 = time.monotonic()
        proc = build_py(layered, image)
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert f"{image} is up to date: reused build" in proc.stderr
        assert "packer build" not in proc.stderr
        print(f"{image} up to date in {took:.2f} s")
        assert took < 1.0 or elapsed < 1.0


def test_a_change_to_compute_rebuilds_only_it(layered: Path) -> None:
    """plan says debian-base is up to date and debian-compute changed, naming the file."""
    vars_file = layered / "images/debian-compute/ansible/vars/packages.yml"
    before = vars_file.read_text()
    vars_file.write_text(before + "# a change to the compute layer alone\n")
    git(layered, "commit", "-qam", "debian-compute: a change")
    try:
        proc = build_py(layered, "plan", "debian-compute")
        assert proc.returncode == 0, proc.stderr
        lines = (proc.stdout + proc.stderr).splitlines()
        base = next(line for line in lines if "debian-base" in line and "up to date" in line)
        changed = next(line for line in lines if "debian-compute" in line and "changed" in line)
        assert "images/debian-compute/ansible/vars/packages.yml" in changed, changed
        assert base
    finally:
        vars_file.write_text(before)
        git(layered, "commit", "-qam", "debian-compute: back")


def test_child_oci_shares_the_parent_layer_in_a_registry(layered: Path) -> None:
    base_outputs = YAML(typ="safe").load(
        (layered / "images/debian-base/image.yaml").read_text())["outputs"]
    if "oci" not in base_outputs:
        pytest.skip("debian-base exports no OCI image (images/debian-base/image.yaml outputs): "
                    "debian-compute's is one layer of its whole tree")
    compute = latest(layered, "debian-compute")
    folder = layered / "mirror" / compute["custom_data"]["mirror_path"]
    base_folder = layered / "mirror" / latest(layered, "debian-base")["custom_data"]["mirror_path"]
    with Registry() as registry:
        digests = {}
        for name, where in (("debian-base", base_folder), ("debian-compute", folder)):
            subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                            f"oci-archive:{where / f'{name}-oci.tar'}",
                            f"docker://{registry.host}/{name}:t"], check=True)
            manifest = json.loads(subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false",
                 f"docker://{registry.host}/{name}:t"],
                check=True, capture_output=True, text=True).stdout)
            digests[name] = [layer["digest"] for layer in manifest["layers"]]
        assert digests["debian-compute"][:-1] == digests["debian-base"]
        assert len(digests["debian-compute"]) == len(digests["debian-base"]) + 1
