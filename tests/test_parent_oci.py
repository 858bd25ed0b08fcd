"""A child image's OCI export is layered (issue 16.1): the parent's OCI image plus one layer of
the child's changes (added and changed files, a whiteout for a removed one). In a real
registry on 127.0.0.1 the child's first layer is the parent's blob, stored once; the child's
image unpacks (skopeo + umoci, as Warewulf imports it) to exactly the child's root tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import build_py, git, make_repo
from tests.registry import Registry
from tests.test_exports import dir_tree, tar_tree
from tests.test_parent import CHILD_YAML, add_child, builds, ok

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    not Registry.available(), reason="docker-registry is not installed (scripts/setup.sh)")]

EXPORTS = ("  rootfs:\n    script: diskless/rootfs.sh\n    path: /tmp/osimage-rootfs.tar\n"
           "  oci: {}\n")
CHILD_CHANGES = """\
#!/bin/sh
set -eu
rm /data/marker
mkdir -p /data/child
echo "child of smoke, $OSIMAGE_VERSION" > /data/child/marker
echo layered >> /etc/hostname
sync
"""




@dataclass
class Pushed:
    repo: Path
    registry: Registry
    version: str
    blobs_after_parent: int
    blobs_after_child: int
    child_log: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, smoke_sources: Path) -> Iterator[Pushed]:
    import hashlib

    tmp = tmp_path_factory.mktemp("layered-oci")
    repo = make_repo(tmp / "repo")
    sources = repo / "build" / "sources" / "smoke"
    shutil.copytree(smoke_sources, sources)
    stamp = hashlib.sha256((repo / "scripts" / "make-smoke-disk.sh").read_bytes()).hexdigest()
    (sources / ".prepare-stamp").write_text(stamp + "\n")
    smoke_yaml = repo / "images" / "smoke" / "image.yaml"
    smoke_yaml.write_text(smoke_yaml.read_text() + EXPORTS)
    add_child(repo, yaml=CHILD_YAML + EXPORTS)
    child = repo / "images" / "smoke-child"
    (child / "provision" / "child.sh").write_text(CHILD_CHANGES)
    (child / "diskless").mkdir()
    shutil.copy2(repo / "images" / "smoke" / "diskless" / "rootfs.sh", child / "diskless")
    with Registry() as registry:
        (repo / "site.yaml").write_text(  # ignored by git: the tree stays clean
            f"registry:\n  url: {registry.host}/osimage\n  tls_verify: false\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "smoke and a child, with OCI exports")
        ok(build_py(repo, "smoke"))
        after_parent = registry.blob_count()
        proc = ok(build_py(repo, "smoke-child"))
        version = builds(repo, "smoke-child")[-1]["custom_data"]["version"]
        yield Pushed(repo, registry, version, after_parent, registry.blob_count(), proc.stderr)


def test_child_oci_is_parents_image_plus_one_layer(pushed: Pushed) -> None:
    parent = pushed.registry.manifest("smoke", pushed.version)
    child = pushed.registry.manifest("smoke-child", pushed.version)
    assert len(parent["layers"]) == 1 and len(child["layers"]) == 2
    assert child["layers"][0]["digest"] == parent["layers"][0]["digest"]
    assert child["layers"][1]["size"] < parent["layers"][0]["size"] / 4
    # the registry keeps the parent's layer once: the child added its layer, config, manifest
    layer = parent["layers"][0]["digest"].removeprefix("sha256:")
    stored = list((pushed.registry.dir / "data").rglob(f"blobs/sha256/*/{layer}/data"))
    assert len(stored) == 1
    assert pushed.blobs_after_child - pushed.blobs_after_parent == 3
    assert "the parent's OCI image plus one layer: " in pushed.child_log
    record = builds(pushed.repo, "smoke-child")[-1]["custom_data"]
    assert record["exports"]["oci"]["digest"].startswith("sha256:")


def test_child_oci_unpacks_to_the_childs_tree(pushed: Pushed, tmp_path: Path) -> None:
    ref = f"docker://{pushed.registry.host}/osimage/smoke-child:{pushed.version}"
    layout = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", ref,
                    f"oci:{layout}:child"], check=True, capture_output=True)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:child", str(bundle)], check=True,
                   capture_output=True)
    published = pushed.repo / "mirror" / "builds" / "smoke-child" / pushed.version
    with tarfile.open(published / "smoke-child-rootfs.tar") as t:
        expected = tar_tree(t)
    got = dir_tree(bundle / "rootfs")
    assert got == expected
    assert "data/marker" not in got and got["data/child/marker"][0] == "file"
    # the published archive is the same image (oci-archive and docker-archive alike)
    inspected = json.loads(subprocess.run(
        ["skopeo", "inspect", f"docker-archive:{published / 'smoke-child-oci.tar'}"],
        check=True, capture_output=True, text=True).stdout)
    assert len(inspected["Layers"]) == 2
    assert inspected["Labels"]["osimage.image"] == "smoke-child"
