"""Diskless exports end to end: a real smoke build makes the rootfs tar in the VM (Packer
downloads it), the kernel and initramfs, a squashfs and an OCI image; the OCI image goes to a
real registry on 127.0.0.1 and comes back with skopeo; the squashfs boots under qemu (TCG)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from osimage.features import exports
from tests.conftest import PROJECT, build_py, git
from tests.registry import Registry

pytestmark = pytest.mark.vm

Tree = dict[str, tuple[Any, ...]]
SECRET = "s3cret-registry-password"


def _norm(name: str) -> str:
    path = name.removeprefix("./").strip("/")
    return "" if path == "." else path


def tar_tree(data: tarfile.TarFile) -> Tree:
    """path -> (type, mode, uid, gid, content) of every member but the root itself."""
    tree: Tree = {}
    for m in data.getmembers():
        path = _norm(m.name)
        if not path or Path(path).name.startswith(".wh."):
            continue
        if m.isdir():
            tree[path] = ("dir", m.mode & 0o7777, m.uid, m.gid)
        elif m.issym():
            tree[path] = ("symlink", m.linkname)
        elif m.isfile() or m.islnk():
            f = data.extractfile(m)
            assert f is not None
            tree[path] = ("file", m.mode & 0o7777, m.uid, m.gid,
                          hashlib.sha256(f.read()).hexdigest())
        else:
            tree[path] = ("other", m.type)
    return tree


def dir_tree(root: Path) -> Tree:
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            path = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                tree[path] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                tree[path] = ("dir", st.st_mode & 0o7777, st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                tree[path] = ("file", st.st_mode & 0o7777, st.st_uid, st.st_gid,
                              hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                tree[path] = ("other", st.st_mode)
    return tree


def oci_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def oci_image(layout: Path) -> tuple[dict[str, Any], Tree]:
    """The config and the root tree (its layers, in order) of the one image in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(oci_blob(layout, index["manifests"][0]["digest"]))
    config = json.loads(oci_blob(layout, manifest["config"]["digest"]))
    tree: Tree = {}
    for layer in manifest["layers"]:
        raw = oci_blob(layout, layer["digest"])
        if layer["mediaType"].endswith("gzip"):
            raw = gzip.decompress(raw)
        with tarfile.open(fileobj=io.BytesIO(raw)) as t:
            tree.update(tar_tree(t))
    return config, tree


def enable_exports(repo: Path, registry_host: str) -> str:
    """The smoke image with every export: its diskless boot files uploaded into /boot (as a
    Rocky image has its kernel and initramfs there), outputs rootfs/boot/squashfs/oci; a site
    file naming the registry. Committed, so the build is clean."""
    boot = repo / "images" / "smoke" / "boot"  # image.yaml's paths stay in its folder
    out = subprocess.run([str(repo / "images/smoke/diskless/make-boot-files.sh"), str(boot)],
                         check=True, capture_output=True, text=True).stdout
    kver = Path(out.splitlines()[0]).name.removeprefix("vmlinuz-")
    image_yaml = repo / "images" / "smoke" / "image.yaml"
    text = image_yaml.read_text()
    text = text.replace("provisioners:\n", "provisioners:\n"
                        "  - name: boot-files\n    type: file\n"
                        "    source: boot/\n    destination: /boot\n", 1)
    text += ("  rootfs:\n    script: diskless/rootfs.sh\n    path: /tmp/osimage-rootfs.tar\n"
             "  boot: {}\n  squashfs: {compression: zstd}\n  oci: {}\n")
    image_yaml.write_text(text)
    (repo / "site.yaml").write_text(  # ignored by git: the tree stays clean
        f"registry:\n  url: {registry_host}/osimage\n  tls_verify: false\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke: diskless exports")
    return kver


@pytest.mark.skipif(not Registry.available(), reason="docker-registry is not installed "
                    "(scripts/setup.sh installs it)")
def test_smoke_diskless_exports(repo: Path, tmp_path: Path, no_leftover_qemu: None) -> None:
    with Registry() as registry:
        kver = enable_exports(repo, registry.host)
        commit = git(repo, "rev-parse", "HEAD").strip()
        version = f"g{commit[:10]}"
        t0 = time.monotonic()
        proc = build_py(repo, "smoke", env={"OSIMAGE_REGISTRY_USERNAME": "builder",
                                            "OSIMAGE_REGISTRY_PASSWORD": SECRET})
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        for step in ("packer build", "hash artifacts", "export rootfs",
                     "extract kernel and initramfs", "build squashfs", "build OCI image",
                     "push OCI image", "publish to mirror", "record in manifest.json"):
            assert f"ok {step} (" in proc.stderr, step
        print(f"smoke build with exports: {elapsed:.1f} s")

        # published beside the disk, each with its sha256 file; recorded with its kind
        published = repo / "mirror" / "builds" / "smoke" / version
        kinds = {"smoke.qcow2": None, "smoke-rootfs.tar": "rootfs",
                 f"vmlinuz-{kver}": "kernel", f"initramfs-{kver}.img": "initramfs",
                 "smoke.squashfs": "squashfs", "smoke-oci.tar": "oci",
                 "smoke.packages.json": "packages", "smoke.cdx.json": "sbom"}  # issue 17
        for name in kinds:
            check = subprocess.run(["sha256sum", "-c", f"{name}.sha256"], cwd=published,
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
        entry = json.loads((repo / "images/smoke/manifest.json").read_text())["builds"][-1]
        assert {f["name"]: f.get("kind") for f in entry["files"]} == kinds
        for f in entry["files"]:
            assert f["size"] == (published / f["name"]).stat().st_size
        custom = entry["custom_data"]
        assert set(custom["sha256"]) == set(kinds)
        ref = f"{registry.host}/osimage/smoke:{version}"
        assert custom["exports"]["oci"]["reference"] == ref
        assert custom["exports"]["kernel_version"] == kver
        for log in (repo / "build" / "smoke" / version).rglob("*.log"):
            assert SECRET not in log.read_text(errors="replace"), log

        # the root tree as the VM had it: provisioned, without pseudo filesystems or identity
        with tarfile.open(published / "smoke-rootfs.tar") as t:
            rootfs = tar_tree(t)
        assert rootfs["data/marker"][0] == "file"
        assert rootfs["proc"][0] == "dir" and rootfs["dev"][0] == "dir"
        assert not [p for p in rootfs if p.startswith(("proc/", "sys/", "dev/", "tmp/"))]
        assert not [p for p in rootfs if "host_key" in p or p == "etc/machine-id"]
        assert rootfs[f"boot/vmlinuz-{kver}"][4] == hashlib.sha256(
            (published / f"vmlinuz-{kver}").read_bytes()).hexdigest()

        # the OCI image, pulled back from the registry: labels and the same root tree
        pulled = tmp_path / "pulled"
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", f"oci:{pulled}:{version}"], check=True,
                       capture_output=True)
        config, oci_tree = oci_image(pulled)
        labels = config["config"]["Labels"]
        assert labels["org.opencontainers.image.title"] == "smoke"
        assert labels["org.opencontainers.image.version"] == version
        assert labels["org.opencontainers.image.revision"] == commit
        assert oci_tree == rootfs
    assert json.loads(subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{published / 'smoke-oci.tar'}"], check=True,
        capture_output=True, text=True).stdout)["Labels"]["osimage.git_commit"] == commit

    # the same tar and commit make the same squashfs, byte for byte
    again = tmp_path / "again.squashfs"
    epoch = git(repo, "show", "-s", "--format=%ct", commit).strip()
    exports.make_squashfs(published / "smoke-rootfs.tar", again, "zstd", epoch,
                          tmp_path / "again.log")
    again_bytes = again.read_bytes()
    assert again_bytes == (published / "smoke.squashfs").read_bytes()

    # a release records every export with its kind, and verifies them against the mirror
    recorded = build_py(repo, "release", "record", "1.0", "smoke")
    assert recorded.returncode == 0, recorded.stderr
    doc = (repo / "manifests" / "manifest.yaml").read_text()
    for name, kind in kinds.items():
        assert f"builds/smoke/{version}/{name}" in doc
        if kind is not None:
            assert f"kind: {kind}" in doc
    verified = build_py(repo, "release", "verify", "1.0")
    assert verified.returncode == 0, verified.stderr
    (published / "smoke.squashfs").write_bytes(b"damaged")
    assert build_py(repo, "release", "verify", "1.0").returncode == 1
    (published / "smoke.squashfs").write_bytes(again_bytes)

    # the squashfs unpacks to the same tree
    unpacked = tmp_path / "unsquashed"
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(unpacked),
                    str(published / "smoke.squashfs")], check=True, capture_output=True)
    assert dir_tree(unpacked) == rootfs

    # the exported kernel and initramfs boot with the squashfs as root, and read the marker
    boot = subprocess.run(
        ["qemu-system-x86_64", "-machine", "accel=tcg", "-m", "256", "-nographic",
         "-no-reboot", "-nodefaults", "-serial", "stdio",
         "-kernel", str(published / f"vmlinuz-{kver}"),
         "-initrd", str(published / f"initramfs-{kver}.img"),
         "-append", "console=ttyS0 quiet panic=-1 osimage.poweroff",
         "-drive", f"file={published / 'smoke.squashfs'},if=virtio,format=raw,readonly=on"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "osimage-diskless: squashfs root mounted from /dev/vda" in boot.stdout, boot.stdout
    assert "osimage smoke marker" in boot.stdout and f"commit={commit}" in boot.stdout


def test_rootfs_scripts_are_shellcheck_clean() -> None:
    for script in ("images/smoke/diskless/rootfs.sh", "images/smoke/diskless/make-boot-files.sh",
                   "images/rocky8-base/scripts/rootfs.sh"):
        proc = subprocess.run(["shellcheck", str(PROJECT / script)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout
