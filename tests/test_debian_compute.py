"""images/debian-compute: a layer on debian-base (parent:), built end to end with the qemu backend:
debian-base, then debian-compute from its published disk, both pushing their OCI images to a
real registry on 127.0.0.1 (debian-compute's is debian-base's plus one layer); the compute
artifact holds the compute packages (dpkg's status) and the base's files; nothing changed,
both are up to date in under a second; then a change to debian-compute alone, which `plan`
names and `./build.py all debian-base debian-compute` rebuilds: debian-base reused, no VM
for it, debian-compute built again. One module-scoped repository: debian-base is built once,
debian-compute twice (the second time by the last test, which changes the repository).

Time under TCG on a shared 2-core machine (measured 2026-11-26): debian-base 52-210 s by load
(90 s idle with its rootfs and OCI exports), then debian-compute 362-550 s, the Ansible
package install in the VM 3-5 minutes of it; the rebuild as long again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import PROJECT, build_py, git, make_repo, under_load
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



@dataclass
class Built:
    """The module's repository after debian-base and debian-compute were built once."""

    repo: Path
    base: dict[str, Any]  # the builds' records in manifest.json
    compute: dict[str, Any]
    compute_log: str
    registry: Registry | None  # where both pushed their OCI images (None: not installed)
    blobs_after_base: int = 0
    blobs_after_compute: int = 0


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory, debian_base_sources: Path
            ) -> Iterator[Built]:
    """A repository where debian-base and then debian-compute were built, published and
    pushed to a registry."""
    repo = make_repo(tmp_path_factory.mktemp("layers") / "repo")
    sources = repo / "build" / "sources" / "debian-base"
    shutil.copytree(debian_base_sources, sources)
    script = repo / "scripts" / "make-debian-base-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(Registry()) if Registry.available() else None
        if registry is not None:  # site.yaml is ignored by git: the tree stays clean
            (repo / "site.yaml").write_text(
                f"registry:\n  url: {registry.host}/osimage\n  tls_verify: false\n")
        blobs, logs = [], []
        for image in ("debian-base", "debian-compute"):
            t0 = time.monotonic()
            proc = build_py(repo, image, timeout=2000)
            assert proc.returncode == 0, proc.stderr[-5000:]
            print(f"{image} build: {time.monotonic() - t0:.0f} s")
            blobs.append(registry.blob_count() if registry is not None else 0)
            logs.append(proc.stderr)
        yield Built(repo, latest(repo, "debian-base"), latest(repo, "debian-compute"), logs[1],
                    registry, *blobs)


def test_compute_artifact_has_its_packages_and_the_base(layered: Built,
                                                        tmp_path: Path) -> None:
    base, compute = layered.base, layered.compute
    base_file = f"{base['custom_data']['mirror_path']}/debian-base.qcow2"
    assert compute["custom_data"]["parent"]["file"] == base_file
    assert compute["custom_data"]["parent"]["sha256"] == \
        base["custom_data"]["sha256"]["debian-base.qcow2"]
    disk = layered.repo / "mirror" / compute["custom_data"]["mirror_path"] / \
        "debian-compute.qcow2"
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
    # the rootfs export's tar was made in a tmpfs: it is not shipped inside the disk
    assert not fs.exists("/var/tmp/osimage-rootfs.tar")
    assert f"offset={ROOT_OFFSET}" in fs.spec


def test_debian_rootfs_scripts_are_one_script() -> None:
    """debian-base and debian-compute export their trees alike (image.yaml names a file of
    its own folder only, so each has a copy)."""
    base = PROJECT / "images" / "debian-base" / "provision" / "rootfs.sh"
    assert base.read_bytes() == (COMPUTE / "provision" / "rootfs.sh").read_bytes()



def test_child_oci_shares_the_parent_layer_in_a_registry(layered: Built) -> None:
    """Both builds pushed: the registry holds debian-base's layer once, and debian-compute's
    push added only its own layer, config and manifest."""
    registry = layered.registry
    if registry is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh)")
    tag = layered.base["custom_data"]["version"]
    assert layered.compute["custom_data"]["version"] == tag
    parent = registry.manifest("debian-base", tag)
    child = registry.manifest("debian-compute", tag)
    assert len(parent["layers"]) == 1 and len(child["layers"]) == 2
    assert child["layers"][0]["digest"] == parent["layers"][0]["digest"]
    assert child["layers"][1]["size"] < parent["layers"][0]["size"] / 2
    layer = parent["layers"][0]["digest"].removeprefix("sha256:")
    stored = list((registry.dir / "data").rglob(f"blobs/sha256/*/{layer}/data"))
    assert len(stored) == 1
    assert layered.blobs_after_base == 3  # the base's layer, config and manifest
    assert layered.blobs_after_compute - layered.blobs_after_base == 3
    assert "the parent's OCI image plus one layer: " in layered.compute_log
    for build in (layered.base, layered.compute):
        assert build["custom_data"]["exports"]["oci"]["digest"].startswith("sha256:")


def test_unchanged_both_are_up_to_date_in_under_a_second(layered: Built) -> None:
    repo = layered.repo
    t0 = time.monotonic()
    proc = build_py(repo, "plan", "debian-compute")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("up to date (build") == 2, out
    for image in ("debian-base", "debian-compute"):
        t0 = time.monotonic()
        proc = build_py(repo, image)
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert f"{image} is up to date: reused build" in proc.stderr
        assert "packer build" not in proc.stderr
        print(f"{image} up to date in {took:.2f} s")
        assert took < under_load(1.0) or elapsed < under_load(1.0)


def section(err: str, image: str) -> str:
    """What `all` printed for one image: from its === line to the next image's."""
    start = err.index(f"=== {image} (")
    end = err.find("\n=== ", start + 1)
    return err[start:] if end < 0 else err[start:end]


def test_a_change_to_compute_rebuilds_only_it(layered: Built) -> None:
    """Last of the module (it changes the repository): a change to a file of debian-compute;
    `plan` names it; `./build.py all debian-base debian-compute` reuses debian-base (no VM, its
    record unchanged) and builds debian-compute again, a clean record whose inputs differ from
    the first build's in the image folder alone."""
    repo = layered.repo
    vars_file = repo / "images/debian-compute/ansible/vars/packages.yml"
    vars_file.write_text(vars_file.read_text() + "# a change to the compute layer alone\n")
    git(repo, "commit", "-qam", "debian-compute: a change")
    commit = git(repo, "rev-parse", "HEAD").strip()
    version = f"g{commit[:10]}"
    base_version = layered.base["custom_data"]["version"]
    old_version = layered.compute["custom_data"]["version"]

    proc = build_py(repo, "plan", "debian-base", "debian-compute")
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    base = next(line for line in lines if " debian-base " in line)
    assert f"up to date (build {base_version})" in base, base
    changed = next(line for line in lines if " debian-compute " in line)
    assert f"changed since build {old_version}: image folder " in changed, changed
    assert changed.rstrip().endswith("(images/debian-compute/ansible/vars/packages.yml)"), \
        changed

    base_manifest = (repo / "images/debian-base/manifest.json").read_bytes()
    t0 = time.monotonic()
    proc = build_py(repo, "all", "debian-base", "debian-compute", timeout=2000)
    print(f"all after the change: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stderr[-5000:]
    err = proc.stderr
    assert "building 2 images in this order: debian-base, debian-compute" in err
    reused = section(err, "debian-base")
    assert f"debian-base is up to date: reused build {base_version} " in reused, reused
    assert "ok check up to date" in reused and "failed" not in reused, reused
    assert "packer build" not in reused
    assert not (repo / "build" / "debian-base" / version).exists()  # no work dir, no VM
    assert (repo / "images/debian-base/manifest.json").read_bytes() == base_manifest
    built = section(err, "debian-compute")
    assert f"parent debian-base {base_version} (its latest clean build)" in built
    assert "(changed: image folder " in built and "==> packer build" in built
    assert f"built debian-compute {version} in " in built
    table = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert f"up to date: build {base_version}" in table["debian-base"], proc.stdout
    assert f"built: {version}" in table["debian-compute"], proc.stdout

    records = json.loads((repo / "images/debian-compute/manifest.json").read_text())["builds"]
    assert len(records) == 2 and records[0] == layered.compute
    new, old = records[1]["custom_data"], layered.compute["custom_data"]
    assert (new["version"], new["git_commit"], new["dirty"], new["published"]) == \
        (version, commit, False, True)
    assert new["parent"] == old["parent"]
    assert new["inputs"].keys() == old["inputs"].keys()
    assert [k for k in new["inputs"] if new["inputs"][k] != old["inputs"][k]] == \
        ["image folder"]
    assert new["inputs_sha256"] != old["inputs_sha256"]
    assert (repo / "mirror" / new["mirror_path"] / "debian-compute.qcow2").is_file()
