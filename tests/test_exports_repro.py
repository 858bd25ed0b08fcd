"""Exports that builds of one commit reproduce, that carry no build secret, that Warewulf
imports, and that only a publishing build pushes.

Two real smoke builds of the same commit with every export: the first published (mirror and a
real docker-registry), the second with --no-publish against a second, empty registry. The
guest's /boot holds two kernels whose names sort one way as strings and the other way as
versions. The builds are shared by the tests of this module; each test checks one promise.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from osimage.features import exports
from tests.conftest import PROJECT, build_py, git, make_repo, qemu_pids, tree_snapshot
from tests.registry import Registry
from tests.test_debug import LOGIN, PAUSE, spawn
from tests.test_exports import dir_tree, enable_exports, oci_image, tar_tree

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(not Registry.available(), reason="docker-registry is not "
                                 "installed (scripts/setup.sh installs it)")]

EXPORTS = ("smoke-rootfs.tar", "smoke.squashfs", "smoke-oci.tar")
# Every ed25519 public key's base64 body starts so; the build's key is one, and its comment
# names the build.
KEY_MARKERS = (b"AAAAC3NzaC1lZDI1NTE5", b"osimage-build-")


def catalog(registry: Registry) -> list[str]:
    with urllib.request.urlopen(f"http://{registry.host}/v2/_catalog", timeout=5) as r:
        repos: list[str] = json.load(r)["repositories"]
    return repos


def older_kernel(kver: str) -> str:
    """A kernel version older than kver by version order but later as a string:
    6.1.0-56-cloud-amd64 -> 6.1.0-6-cloud-amd64 (as 6.1.0-9 sorts after 6.1.0-10)."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+-)(\d+)(.*)", kver)
    if m is None or len(m.group(2)) < 2 or m.group(2)[0] == "9":
        pytest.skip(f"no shorter, older ABI number for the host kernel {kver}")
    return f"{m.group(1)}{int(m.group(2)[0]) + 1}{m.group(3)}"


def add_older_kernel(repo: Path, kver: str) -> str:
    """A second kernel and its initramfs in the files uploaded to the guest's /boot
    (committed: they are part of the image folder)."""
    old = older_kernel(kver)
    boot = repo / "images" / "smoke" / "boot"
    (boot / f"vmlinuz-{old}").write_bytes(b"the older kernel\n")
    (boot / f"initramfs-{old}.img").write_bytes(b"the older kernel's initramfs\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke: an older kernel that sorts later as a string")
    return old


@dataclass
class Builds:
    repo: Path
    version: str
    kver: str
    old_kver: str
    published: Path  # the first build's files on the mirror
    unpublished: Path  # the second (--no-publish) build's exports in its work folder
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    first_registry: list[str]
    second_registry: list[str]
    mirror_before: dict[str, bytes]
    mirror_after: dict[str, bytes]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, smoke_sources: Path) -> Iterator[Builds]:
    repo = make_repo(tmp_path_factory.mktemp("repro") / "repo")
    sources = repo / "build" / "sources" / "smoke"
    shutil.copytree(smoke_sources, sources)
    script = repo / "scripts" / "make-smoke-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest()
                                            + "\n")
    before = qemu_pids(repo)
    with Registry() as first_reg, Registry() as second_reg:
        kver = enable_exports(repo, first_reg.host)
        old = add_older_kernel(repo, kver)
        version = f"g{git(repo, 'rev-parse', 'HEAD')[:10]}"
        first = build_py(repo, "smoke")
        assert first.returncode == 0, first.stderr
        mirror_before = tree_snapshot(repo / "mirror")
        # the same commit again, not published, the site file naming another registry
        (repo / "site.yaml").write_text(
            f"registry:\n  url: {second_reg.host}/osimage\n  tls_verify: false\n")
        second = build_py(repo, "smoke", "--no-publish")
        assert second.returncode == 0, second.stderr
        yield Builds(repo=repo, version=version, kver=kver, old_kver=old,
                     published=repo / "mirror" / "builds" / "smoke" / version,
                     unpublished=repo / "build" / "smoke" / version / "exports",
                     first=first, second=second, first_registry=catalog(first_reg),
                     second_registry=catalog(second_reg), mirror_before=mirror_before,
                     mirror_after=tree_snapshot(repo / "mirror"))
    assert not (qemu_pids(repo) - before), "a build left its VM running"


def test_no_publish_build_pushes_nothing_and_leaves_the_mirror(builds: Builds) -> None:
    assert builds.first_registry == ["osimage/smoke"]
    assert "ok push OCI image (" in builds.first.stderr
    assert builds.second_registry == [], "a --no-publish build pushed to the registry"
    assert "push OCI image" not in builds.second.stderr
    assert "publish to mirror" not in builds.second.stderr
    assert builds.mirror_after == builds.mirror_before
    for name in EXPORTS:  # the exports are made all the same, in the work folder
        assert (builds.unpublished / name).is_file(), name


def test_same_commit_gives_byte_identical_exports(builds: Builds) -> None:
    kernel = (f"vmlinuz-{builds.kver}", f"initramfs-{builds.kver}.img")
    for name in (*EXPORTS, *kernel):
        first = (builds.published / name).read_bytes()
        assert first == (builds.unpublished / name).read_bytes(), f"{name} differs"
    # the OCI image's one layer is the rootfs tar itself, gzipped the same way both times
    layers = []
    for where in (builds.published, builds.unpublished):
        with tarfile.open(where / "smoke-oci.tar") as t:
            index = json.load(t.extractfile("index.json"))  # type: ignore[arg-type]
            manifest = json.load(t.extractfile(  # type: ignore[arg-type]
                "blobs/" + index["manifests"][0]["digest"].replace(":", "/")))
            layer = manifest["layers"][0]["digest"]
            blob = t.extractfile("blobs/" + layer.replace(":", "/"))
            assert blob is not None
            assert gzip.decompress(blob.read()) == (where / "smoke-rootfs.tar").read_bytes()
        layers.append(layer)
    assert layers[0] == layers[1]
    # file times clamped to the commit's time
    epoch = int(git(builds.repo, "show", "-s", "--format=%ct", "HEAD"))
    with tarfile.open(builds.published / "smoke-rootfs.tar") as t:
        times = {m.name: m.mtime for m in t}
    assert max(times.values()) <= epoch
    assert times["./data/marker"] == epoch


def views(path: Path, scratch: Path) -> Iterator[tuple[str, bytes]]:
    """The bytes of a published file as stored and as unpacked: a disk as raw, gzip
    decompressed, each member of a tar (and of its gzip layers), each file of a squashfs."""
    data = path.read_bytes()
    yield path.name, data
    if data[:2] == b"\x1f\x8b":
        yield f"{path.name} (gunzip)", gzip.decompress(data)
    if path.suffix == ".qcow2":
        raw = scratch / (path.name + ".raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
        yield f"{path.name} (raw)", raw.read_bytes()
    elif path.suffix == ".squashfs":
        tree = scratch / (path.name + ".d")
        subprocess.run(["unsquashfs", "-no-progress", "-d", str(tree), str(path)], check=True,
                       capture_output=True)
        for f in sorted(tree.rglob("*")):
            if f.is_file() and not f.is_symlink():
                yield f"{path.name}:{f.relative_to(tree)}", f.read_bytes()
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            for m in t:
                member = t.extractfile(m) if m.isfile() else None
                if member is not None:
                    content = member.read()
                    yield f"{path.name}:{m.name}", content
                    if content[:2] == b"\x1f\x8b":
                        yield f"{path.name}:{m.name} (gunzip)", gzip.decompress(content)


def test_build_key_is_in_no_output(builds: Builds, tmp_path: Path) -> None:
    published = sorted(p for p in builds.published.iterdir() if not p.name.endswith(".sha256"))
    assert {p.name for p in published} >= {"smoke.qcow2", *EXPORTS}
    seen = 0
    for i, path in enumerate([*published, *(builds.unpublished / n for n in EXPORTS)]):
        scratch = tmp_path / str(i)
        scratch.mkdir()
        for name, data in views(path, scratch):
            seen += 1
            for marker in KEY_MARKERS:
                assert marker not in data, f"the build's SSH key is in {name}"
    assert seen > 100  # every member of the tars was looked at, not just the files
    with tarfile.open(builds.published / "smoke-rootfs.tar") as t:
        names = set(t.getnames())
    assert "./root/.ssh" in names and "./root/.ssh/authorized_keys" not in names


def test_newest_kernel_by_version_order_with_its_initramfs(builds: Builds) -> None:
    # both kernels are in the image; the newer by version (not the later string) is exported
    with tarfile.open(builds.published / "smoke-rootfs.tar") as t:
        names = set(t.getnames())
    assert f"./boot/vmlinuz-{builds.old_kver}" in names
    assert f"boot/vmlinuz-{builds.old_kver}" > f"boot/vmlinuz-{builds.kver}"
    kinds = {f["name"]: f.get("kind") for f in json.loads(
        (builds.repo / "images/smoke/manifest.json").read_text())["builds"][0]["files"]}
    assert kinds[f"vmlinuz-{builds.kver}"] == "kernel"
    assert kinds[f"initramfs-{builds.kver}.img"] == "initramfs"
    assert not [n for n in kinds if builds.old_kver in n]
    assert (builds.published / f"vmlinuz-{builds.kver}").read_bytes() == (
        Path("/boot") / f"vmlinuz-{builds.kver}").read_bytes()
    initramfs = builds.repo / "images/smoke/boot" / f"initramfs-{builds.kver}.img"
    assert (builds.published / f"initramfs-{builds.kver}.img").read_bytes() == (
        initramfs.read_bytes())
    # the order itself, as `sort -V` and rpm have it
    assert exports.version_key("6.1.0-9") < exports.version_key("6.1.0-10")
    assert exports.version_key("4.18.0-80.el8.x86_64") < exports.version_key(
        "4.18.0-348.7.1.el8_5.x86_64")


def test_warewulf_imports_the_published_archive(builds: Builds, tmp_path: Path) -> None:
    """`wwctl image import FILE` reads a local file as docker-archive: (no colon in the path,
    the one image in its manifest.json), copies it to an OCI layout and unpacks it with umoci
    (Warewulf's internal/pkg/oci/puller.go): the same steps, with skopeo and umoci."""
    archive = tmp_path / "rocky" / "smoke-oci.tar"  # as downloaded from the mirror
    archive.parent.mkdir()
    shutil.copy(builds.published / "smoke-oci.tar", archive)
    inspected = subprocess.run(["skopeo", "inspect", f"docker-archive:{archive}"],
                               capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Labels"]["osimage.version"] == builds.version
    cache = tmp_path / "cache"
    copied = subprocess.run(["skopeo", "copy", "--quiet", f"docker-archive:{archive}",
                             f"oci:{cache}:import"], capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    config, tree = oci_image(cache)
    assert config["config"]["Labels"]["osimage.git_commit"] == git(builds.repo, "rev-parse",
                                                                   "HEAD").strip()
    with tarfile.open(builds.published / "smoke-rootfs.tar") as t:
        rootfs = tar_tree(t)
    assert tree == rootfs
    bundle = tmp_path / "bundle"
    unpacked = subprocess.run(["umoci", "unpack", "--image", f"{cache}:import", str(bundle)],
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    assert dir_tree(bundle / "rootfs") == rootfs
    assert (bundle / "rootfs" / "bin" / "sh").exists()  # Warewulf's check of a chroot
    # and it is still an OCI archive, with the same image as the registry holds
    oci = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True,
                         text=True)
    assert oci.returncode == 0, oci.stderr
    assert json.loads(oci.stdout)["Labels"]["osimage.version"] == builds.version


def test_interactive_build_pushes_nothing(repo: Path, no_leftover_qemu: None) -> None:
    """--break-after (as --debug) builds every export but neither pushes nor publishes."""
    with Registry() as registry:
        enable_exports(repo, registry.host)
        child = spawn(repo, "smoke", "--break-after", "marker")
        child.expect(LOGIN)
        child.expect(PAUSE)
        child.send("\r")
        child.expect(pexpect.EOF, timeout=240)
        child.close()
        assert child.exitstatus == 0, str(child.before)
        assert catalog(registry) == [], "an interactive build pushed to the registry"
    assert "build OCI image" in str(child.before)
    assert "push OCI image" not in str(child.before)
    assert not (repo / "mirror").exists() or not any((repo / "mirror").rglob("*"))
    version = f"g{git(repo, 'rev-parse', 'HEAD')[:10]}-debug"
    assert (repo / "build" / "smoke" / version / "exports" / "smoke-oci.tar").is_file()


def test_rootfs_script_is_shellcheck_clean() -> None:
    for script in ("images/smoke/diskless/rootfs.sh", "images/rocky8-base/scripts/rootfs.sh",
                   "images/rocky8-base/scripts/cleanup.sh"):
        proc = subprocess.run(["shellcheck", str(PROJECT / script)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout



@pytest.mark.parametrize("fault", ["keeps the key", "clamps no time"])
def test_rootfs_tar_with_key_or_late_times_is_refused(repo: Path, fault: str,
                                                     no_leftover_qemu: None) -> None:
    """The host checks what any image's rootfs script made: a tar with the build's key in a
    .ssh/ file, or with a file newer than SOURCE_DATE_EPOCH, fails the build before anything
    is pushed or published, with one line naming the script to fix."""
    with Registry() as registry:
        enable_exports(repo, registry.host)
        script = repo / "images/smoke/diskless/rootfs.sh"
        text = script.read_text()
        broken = (text.replace(" -o -path ./root/.ssh/authorized_keys", "")
                  if fault == "keeps the key" else
                  text.replace("epoch=${SOURCE_DATE_EPOCH:?}",
                               "epoch=$(( ${SOURCE_DATE_EPOCH:?} + 86400 ))"))
        assert broken != text
        script.write_text(broken)
        git(repo, "commit", "-qam", f"rootfs.sh {fault}")
        proc = build_py(repo, "smoke")
        assert proc.returncode == 1, proc.stderr
        assert catalog(registry) == []
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    expected = ("root/.ssh/authorized_keys holds the build's SSH key" if fault == "keeps the key"
                else "newer than SOURCE_DATE_EPOCH")
    assert expected in errors[0]
    assert "images/smoke/diskless/rootfs.sh must" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / "mirror").exists() or not any((repo / "mirror").rglob("*"))
    assert not (repo / "images/smoke/manifest.json").exists()
