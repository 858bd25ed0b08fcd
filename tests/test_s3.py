"""S3 for OpenCHAMI (issue 18.2): a real smoke build with diskless exports uploads squashfs,
kernel and initramfs to a real S3 server on 127.0.0.1 (moto's standalone server), the URLs are
recorded, the same bytes are not sent again, release verify finds a changed object, and a
wrong bucket is refused before the VM starts. One build is shared by the module's tests."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from osimage.publish import artifacts, s3
from osimage.publish.mirrorlock import PublishRefused
from tests.conftest import build_py, git, make_repo, qemu_pids
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server

pytestmark = pytest.mark.skipif(not S3Server.available(),
                                reason="needs moto's server (pip install 'moto[server]')")

BUCKET = "boot-images"
PREFIX = "osimage"
MiB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with S3Server() as srv:
        srv.client().create_bucket(Bucket=BUCKET)
        yield srv


def site_yaml(server: S3Server, bucket: str = BUCKET) -> str:
    return f"s3:\n  endpoint: {server.endpoint}\n  bucket: {bucket}\n  prefix: {PREFIX}\n"


@dataclass
class Built:
    repo: Path
    version: str
    stderr: str
    seconds: float

    def entry(self) -> dict[str, Any]:
        doc = json.loads((self.repo / "images/smoke/manifest.json").read_text())
        last: dict[str, Any] = doc["builds"][-1]
        return last


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, smoke_sources: Path,
          server: S3Server) -> Built:
    """The smoke image with rootfs, boot files and squashfs, built once and uploaded."""
    repo = make_repo(tmp_path_factory.mktemp("s3") / "repo")
    shutil.copytree(smoke_sources, repo / "build/sources/smoke")
    script = repo / "scripts/make-smoke-disk.sh"
    (repo / "build/sources/smoke/.prepare-stamp").write_text(
        hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    boot = repo / "images/smoke/boot"
    import subprocess

    subprocess.run([str(repo / "images/smoke/diskless/make-boot-files.sh"), str(boot)],
                   check=True, capture_output=True)
    image_yaml = repo / "images/smoke/image.yaml"
    text = image_yaml.read_text().replace(
        "provisioners:\n", "provisioners:\n  - name: boot-files\n    type: file\n"
        "    source: boot/\n    destination: /boot\n", 1)
    image_yaml.write_text(text + "  rootfs:\n    script: diskless/rootfs.sh\n"
                          "    path: /tmp/osimage-rootfs.tar\n"
                          "  boot: {}\n  squashfs: {compression: zstd}\n")
    (repo / "site.yaml").write_text(site_yaml(server))  # ignored by git
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke: diskless exports")
    version = f"g{git(repo, 'rev-parse', 'HEAD').strip()[:10]}"
    t0 = time.monotonic()
    proc = build_py(repo, "smoke", env=server.env, timeout=900)
    seconds = time.monotonic() - t0
    print(f"smoke build with exports and S3: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr
    return Built(repo, version, proc.stdout + proc.stderr, seconds)


def boot_files(built: Built) -> dict[str, dict[str, Any]]:
    """name -> manifest.json file entry, for what OpenCHAMI boots from."""
    return {f["name"]: f for f in built.entry()["files"] if f.get("kind") in s3.KINDS}


def test_a_build_uploads_the_boot_files(built: Built, server: S3Server) -> None:
    assert "ok check s3 (" in built.stderr and "ok upload to s3 (" in built.stderr
    files = boot_files(built)
    assert sorted(f["kind"] for f in files.values()) == ["initramfs", "kernel", "squashfs"]
    client = server.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/smoke/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(
        f"{PREFIX}/smoke/{built.version}/{name}" for name in files)
    custom = built.entry()["custom_data"]
    base = f"{server.endpoint}/{BUCKET}/{PREFIX}/smoke/{built.version}"
    assert custom["exports"]["s3"] == {name: f"{base}/{name}" for name in files}
    mirror = built.repo / "mirror/builds/smoke" / built.version
    for name, f in files.items():
        head = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/smoke/{built.version}/{name}")
        assert head["ContentLength"] == f["size"]
        assert head["Metadata"]["sha256"] == custom["sha256"][name]
        body = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/smoke/{built.version}/{name}")
        assert hashlib.sha256(body["Body"].read()).hexdigest() == custom["sha256"][name]
        assert (mirror / name).is_file()  # published to the mirror as before
    # credentials only through boto3's chain: never in the output or a log
    for text in [built.stderr, *(p.read_text(errors="replace") for p in
                                 (built.repo / "build/smoke").rglob("*.log"))]:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_the_same_bytes_are_not_sent_again(built: Built, server: S3Server, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    mirror = built.repo / "mirror/builds/smoke" / built.version
    files = [artifacts.Artifact(mirror / name, f["size"],
                                built.entry()["custom_data"]["sha256"][name], f["kind"])
             for name, f in boot_files(built).items()]
    client = server.client()
    keys = [f"{PREFIX}/smoke/{built.version}/{a.name}" for a in files]
    before = [client.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys]
    said: list[str] = []
    site = s3.S3Site(server.endpoint, BUCKET, PREFIX)
    done = s3.upload(site, files, "smoke", built.version, said.append)
    assert [u.sent for u in done.values()] == [False] * 3
    assert all("already in s3://" in line for line in said)
    assert [client.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys] == before
    # other bytes under a published name: refused (exit 2), nothing sent, as on the mirror
    other = tmp_path / files[0].name
    other.write_bytes(b"other bytes")
    changed = [artifacts.record(other), *files[1:]]
    with pytest.raises(PublishRefused, match="never replaced without --replace") as err:
        s3.upload(site, changed, "smoke", built.version)
    assert err.value.exit_code == 2 and files[0].name in str(err.value)
    assert [client.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys] == before


def test_large_files_go_in_parts(server: S3Server, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "big.squashfs"
    path.write_bytes(hashlib.sha256(b"x").digest() * (40 * MiB // 32))
    art = artifacts.record(path)
    site = s3.S3Site(server.endpoint, BUCKET, "parts")
    [done] = s3.upload(site, [art], "big", "1.0").values()
    assert done.sent
    head = server.client().head_object(Bucket=BUCKET, Key="parts/big/1.0/big.squashfs")
    assert head["ETag"].strip('"').endswith("-3")  # three 16 MiB parts: a multipart upload
    assert head["Metadata"]["sha256"] == art.sha256
    assert s3.measure(done.url, art.size, art.sha256) is None


def test_release_verify_finds_a_changed_object(built: Built, server: S3Server) -> None:
    recorded = build_py(built.repo, "release", "record", "1.0", "smoke", env=server.env)
    assert recorded.returncode == 0, recorded.stderr
    doc = (built.repo / "manifests/manifest.yaml").read_text()
    files = boot_files(built)
    for name in files:
        assert f"s3: {server.endpoint}/{BUCKET}/{PREFIX}/smoke/{built.version}/{name}" in doc
    ok = build_py(built.repo, "release", "verify", "1.0", env=server.env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(f"{server.endpoint}/{BUCKET}/") == 3
    name = next(n for n, f in files.items() if f["kind"] == "squashfs")
    key = f"{PREFIX}/smoke/{built.version}/{name}"
    client = server.client()
    original = client.get_object(Bucket=BUCKET, Key=key)
    data = original["Body"].read()
    # same size, same sha256 metadata, other bytes: only the re-read finds it
    tampered = bytes([data[0] ^ 0xFF]) + data[1:]
    client.put_object(Bucket=BUCKET, Key=key, Body=tampered, Metadata=original["Metadata"])
    try:
        bad = build_py(built.repo, "release", "verify", "1.0", env=server.env)
        assert bad.returncode == 1, bad.stderr
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{BUCKET}/{key}" in errors[0], bad.stderr
        assert "sha256" in errors[0]
        assert "Traceback" not in bad.stderr
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=data, Metadata=original["Metadata"])


def test_a_wrong_bucket_is_refused_before_the_vm(built: Built, server: S3Server) -> None:
    site = built.repo / "site.yaml"
    good = site.read_text()
    if git(built.repo, "status", "--porcelain").strip():  # a release recorded meanwhile
        git(built.repo, "commit", "-qam", "release")
    try:
        site.write_text(site_yaml(server, "no-such-bucket"))
        before = qemu_pids()
        proc = build_py(built.repo, "smoke", "--rebuild", env=server.env)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: site file: s3.bucket: no bucket 'no-such-bucket' at "
                          f"{server.endpoint}"], proc.stderr
        assert "packer build" not in proc.stderr and "prepare source" not in proc.stderr
        assert qemu_pids(built.repo) <= before
        # no credentials at all: refused the same way, naming what to set
        site.write_text(good)
        bare = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        proc = build_py(built.repo, "smoke", "--rebuild", env={**server.env, **bare})
        assert proc.returncode == 2, proc.stderr
        assert "error: site file: s3: no AWS credentials found" in proc.stderr
        assert "packer build" not in proc.stderr
    finally:
        site.write_text(good)


def test_no_publish_and_debug_leave_s3_alone() -> None:
    from osimage.build.context import BuildOptions
    from osimage.build.feature import assemble, select
    from osimage.build.steps import CORE
    from osimage.features import exports

    ctx: Any = SimpleNamespace(
        image=SimpleNamespace(data={"outputs": {"disk": {}, "rootfs": {}, "boot": {},
                                                "squashfs": {}}}),
        create_patches=False,
        site=SimpleNamespace(data={"s3": {"endpoint": "http://s3:9000", "bucket": BUCKET}}))
    steps = assemble(CORE, exports.FEATURE.steps(ctx), set())

    def names(**opts: Any) -> list[str]:
        return [s.name for s in select(steps, BuildOptions(image="smoke", **opts))]

    assert names().index("check s3") < names().index("prepare source")
    assert names().index("upload to s3") < names().index("publish to mirror")
    for opts in ({"publish": False}, {"debug": True}):
        assert "check s3" not in names(**opts) and "upload to s3" not in names(**opts)
