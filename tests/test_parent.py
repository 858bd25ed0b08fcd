"""Layered images (issue 16.1): `parent: smoke` in a child's image.yaml. The child starts from
the parent's latest clean build (or the file `--release X` records), fetched from the mirror
and checked, written to as a qcow2 overlay and published flattened; its record names the
parent's file. One module-scoped repository shares the builds: smoke, its child, smoke again
after a change, the child again, the child of release 1.0."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_py, git, make_repo
from tests.netns_libvirt import NetnsLibvirt, netns_libvirt  # noqa: F401 - the fixture
from tests.test_libvirt_native_build import build_in_netns, leftovers, native_site
from tests.test_uptodate import watched

pytestmark = pytest.mark.vm

P2_OFFSET = 67108864  # the smoke disk's data partition (scripts/make-smoke-disk.sh)

CHILD_YAML = """\
description: a layer on smoke (the tests' child image)
parent: smoke
disk_size: 128M
memory: 256
cpus: 1
boot_wait: 3s
ssh:
  username: root
  timeout: 2m
shutdown_command: poweroff
provisioners:
  - name: child-marker
    type: shell
    script: provision/child.sh
outputs:
  disk:
    format: qcow2
"""
CHILD_SCRIPT = """\
#!/bin/sh
set -eu
echo "child of smoke, $OSIMAGE_VERSION" > /data/child-marker
sync
"""


def add_child(repo: Path, name: str = "smoke-child", yaml: str = CHILD_YAML) -> None:
    folder = repo / "images" / name
    (folder / "provision").mkdir(parents=True)
    (folder / "image.yaml").write_text(yaml)
    script = folder / "provision" / "child.sh"
    script.write_text(CHILD_SCRIPT)
    script.chmod(0o755)


def builds(repo: Path, image: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(
        (repo / "images" / image / "manifest.json").read_text())["builds"]
    return data


def disk_of(build: dict[str, Any]) -> tuple[str, str]:
    """(mirror path, sha256) of a recorded build's disk."""
    data = build["custom_data"]
    name = next(f["name"] for f in build["files"] if "kind" not in f)
    return f"{data['mirror_path']}/{name}", data["sha256"][name]


def read_file(artifact: Path, path: str, tmp: Path) -> str:
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)], check=True)
    try:
        out = subprocess.run(["debugfs", "-R", f"cat {path}", f"{raw}?offset={P2_OFFSET}"],
                             check=True, capture_output=True, text=True)
    finally:
        raw.unlink()
    return out.stdout


def qemu_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@dataclass
class Layered:
    repo: Path
    tmp: Path
    smoke_a: dict[str, Any]  # smoke's first build, recorded by release 1.0
    child_1: dict[str, Any]  # the child built from it
    child_log: str


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory, smoke_sources: Path) -> Iterator[Layered]:
    import hashlib

    tmp = tmp_path_factory.mktemp("layered")
    repo = make_repo(tmp / "repo")
    sources = repo / "build" / "sources" / "smoke"
    shutil.copytree(smoke_sources, sources)
    stamp = hashlib.sha256((repo / "scripts" / "make-smoke-disk.sh").read_bytes()).hexdigest()
    (sources / ".prepare-stamp").write_text(stamp + "\n")
    add_child(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke-child: a layer on smoke")
    ok(build_py(repo, "smoke"))
    ok(build_py(repo, "release", "record", "1.0", "smoke"))
    git(repo, "commit", "-qam", "release 1.0")
    child = ok(build_py(repo, "smoke-child"))
    yield Layered(repo, tmp, builds(repo, "smoke")[-1], builds(repo, "smoke-child")[-1],
                  child.stderr)


def test_child_starts_from_parents_latest_clean_build(layered: Layered, tmp_path: Path) -> None:
    repo, child = layered.repo, layered.child_1
    parent_file, parent_sha = disk_of(layered.smoke_a)
    version = layered.smoke_a["custom_data"]["version"]
    assert f"parent smoke {version} (its latest clean build): smoke.qcow2" in layered.child_log
    assert child["custom_data"]["parent"] == {
        "image": "smoke", "version": version, "release": None, "file": parent_file,
        "sha256": parent_sha}
    # the VM wrote to an overlay over the parent's disk (not a copy of it) ...
    hcl = (repo / "build" / "smoke-child" / child["custom_data"]["version"]
           / "smoke-child.pkr.hcl").read_text()
    assert "use_backing_file = true" in hcl
    assert "flattened into a standalone qcow2" in layered.child_log
    # ... and the published child is a standalone disk with the parent's files and its own
    path, _ = disk_of(child)
    published = repo / "mirror" / path
    assert "backing-filename" not in qemu_info(published)
    assert f"version={version}" in read_file(published, "/marker", tmp_path)
    assert read_file(published, "/child-marker", tmp_path) == (
        f"child of smoke, {child['custom_data']['version']}\n")


def test_release_build_up_to_date_from_its_records(layered: Layered) -> None:
    """--release X: the up-to-date check reads the release's records (the parent's file, the
    patch tarball's sha256) and needs no download to decide; old code never judged a
    --release build up to date."""
    repo = layered.repo
    label = f"reused build {layered.child_1['custom_data']['version']}"
    proc, _, vms = watched(repo, "smoke-child", "--release", "1.0")
    assert proc.returncode == 0 and f"smoke-child is up to date: {label}" in proc.stderr, (
        proc.stderr)
    assert not vms
    proc, _, vms = watched(repo, "smoke", "--release", "1.0")
    assert proc.returncode == 0, proc.stderr
    assert "smoke is up to date: reused build " + layered.smoke_a["custom_data"]["version"] in (
        proc.stderr)
    # a release that names a patch tarball: another input, known from the record alone
    manifest = repo / "manifests" / "manifest.yaml"
    saved = manifest.read_text()
    manifest.write_text(saved + "  '1.1':\n    patches:\n      path: repos/Rocky8/smoke-patches-"
                        "20260101.tar.gz\n      sha256: " + "ab" * 32 + "\n      size: 10\n"
                        "    images: {}\n")
    git(repo, "commit", "-qam", "release 1.1 names a patch tarball")
    try:
        proc, _, vms = watched(repo, "smoke", "--release", "1.1")
        assert "builds: the inputs changed since build" in proc.stderr, proc.stderr
        assert proc.returncode == 1 and "not on the local mirror" in proc.stderr
        assert not vms
    finally:
        manifest.write_text(saved)
        git(repo, "commit", "-qam", "release 1.1 dropped")


def test_new_parent_build_changes_the_childs_inputs(layered: Layered, tmp_path: Path) -> None:
    repo = layered.repo
    marker = repo / "images" / "smoke" / "provision" / "marker.sh"
    marker.write_text(marker.read_text() + "echo second >> /data/marker\n")
    git(repo, "commit", "-qam", "smoke: a second line")
    # smoke changed, but the child starts from smoke's build, which did not yet
    proc = ok(build_py(repo, "smoke-child"))
    assert "smoke-child is up to date" in proc.stderr
    ok(build_py(repo, "smoke"))
    smoke_b = builds(repo, "smoke")[-1]
    proc = ok(build_py(repo, "smoke-child"))
    assert "builds: the inputs changed since build" in proc.stderr
    child_2 = builds(repo, "smoke-child")[-1]
    assert child_2["custom_data"]["inputs_sha256"] != layered.child_1["custom_data"][
        "inputs_sha256"]
    assert child_2["custom_data"]["parent"]["file"] == disk_of(smoke_b)[0]
    path, _ = disk_of(child_2)
    assert "second" in read_file(repo / "mirror" / path, "/marker", tmp_path)


def test_release_child_starts_from_the_releases_file(layered: Layered) -> None:
    """Release 1.0 records smoke's first build; smoke's latest build is another one."""
    repo = layered.repo
    ok(build_py(repo, "smoke-child", "--release", "1.0"))
    child = builds(repo, "smoke-child")[-1]
    parent_file, parent_sha = disk_of(layered.smoke_a)
    assert child["custom_data"]["version"] == "1.0"
    assert child["custom_data"]["parent"] == {
        "image": "smoke", "version": layered.smoke_a["custom_data"]["version"],
        "release": "1.0", "file": parent_file, "sha256": parent_sha}
    assert parent_file != disk_of(builds(repo, "smoke")[-1])[0]
    assert "backing-filename" not in qemu_info(repo / "mirror" / disk_of(child)[0])


def test_tampered_parent_refused_before_the_vm(layered: Layered, tmp_path: Path) -> None:
    repo = layered.repo
    parent_file, _ = disk_of(builds(repo, "smoke")[-1])
    on_mirror = repo / "mirror" / parent_file
    saved = on_mirror.read_bytes()
    before = (repo / "images" / "smoke-child" / "manifest.json").read_bytes()
    tampered = bytearray(saved)
    tampered[-1] ^= 0xFF
    on_mirror.write_bytes(bytes(tampered))
    try:
        env_cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # nothing cached yet
        proc = build_py(repo, "smoke-child", "--no-publish", env=env_cache)
    finally:
        on_mirror.write_bytes(saved)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and parent_file in errors[0] and "refused" in errors[0], errors
    assert "packer build" not in proc.stderr
    assert (repo / "images" / "smoke-child" / "manifest.json").read_bytes() == before
    assert not list((tmp_path / "cache" / "osimage" / "parents").glob("*.qcow2"))


@pytest.mark.parametrize(("yaml", "line"), [
    (CHILD_YAML.replace("parent: smoke\n", "parent: smoke\nsource:\n  disk: x.qcow2\n"
                        "  checksum: sha256:" + "0" * 64 + "\n"),
     "error: images/bad/image.yaml: source: give exactly one of 'source' or 'parent' "
     "(both given)"),
    (CHILD_YAML.replace("parent: smoke\n", ""),
     "error: images/bad/image.yaml: source: give exactly one of 'source' or 'parent' "
     "(neither given)"),
    (CHILD_YAML.replace("parent: smoke", "parent: smoek"),
     "error: images/bad/image.yaml: parent: no image folder images/smoek/"),
    (CHILD_YAML.replace("parent: smoke", "parent: bad-too"),
     "error: images/bad/image.yaml: parent: a cycle: bad -> bad-too -> bad"),
    (CHILD_YAML.replace("parent: smoke", "parent: debian-base"),
     "error: images/debian-base/manifest.json: builds: no clean published build of "
     "debian-base, the parent of bad"),
], ids=["both", "neither", "no-folder", "cycle", "no-parent-build"])
def test_bad_parent_one_line_exit_2(layered: Layered, yaml: str, line: str) -> None:
    repo = layered.repo
    add_child(repo, "bad", yaml)
    add_child(repo, "bad-too", CHILD_YAML.replace("parent: smoke", "parent: bad"))
    try:
        proc = build_py(repo, "bad", "--skip-commit")
    finally:
        shutil.rmtree(repo / "images" / "bad")
        shutil.rmtree(repo / "images" / "bad-too")
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), proc.stderr
    assert "Traceback" not in proc.stderr
    if "debian-base" in line:
        assert "./build.py debian-base" in proc.stderr



def test_libvirt_native_child(netns_env: NetnsLibvirt, repo: Path, tmp_path: Path) -> None:
    """libvirt driver native: the parent's disk is the source volume under the build's
    overlay; the child comes back flattened, with the parent's files and its own."""
    add_child(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke-child: a layer on smoke")
    ok(build_py(repo, "smoke"))  # the parent on the qemu backend: any clean build will do
    parent_file, parent_sha = disk_of(builds(repo, "smoke")[-1])
    native_site(repo, netns_env)
    proc = ok(build_in_netns(netns_env, repo, "smoke-child"))
    assert f"osimage-src-smoke-child-{parent_sha[:16]}" in proc.stderr
    child = builds(repo, "smoke-child")[-1]
    assert child["builder_type"] == "libvirt-native"
    assert child["custom_data"]["parent"]["file"] == parent_file
    published = repo / "mirror" / disk_of(child)[0]
    assert "backing-filename" not in qemu_info(published)
    assert "osimage smoke marker" in read_file(published, "/marker", tmp_path)
    assert read_file(published, "/child-marker", tmp_path).startswith("child of smoke, ")
    assert leftovers(netns_env) == []
