"""Patch tarballs through ./build.py and the library, as a release engineer meets them: an
archive other tars read differently and a compression bomb refused before any VM, repository
metadata checked with every checksum type createrepo_c writes, a damaged partial download
started over, and `release set-patches` reading size and sha256 from the mirror.
"""

# ruff: noqa: F811  (the fixtures imported from test_patches are parameters here)
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osimage.features import patchindex, tarcheck
from osimage.features.patchindex import PatchContentError
from osimage.publish import download
from tests.conftest import build_py, git, qemu_pids, tree_snapshot
from tests.test_patches import (  # noqa: F401  (fixtures among them)
    ADVISORIES,
    RangeServer,
    cache_env,
    mirror_http,
    rpms,
    smoke_tarball,
    write_release,
)
from tests.test_tarcheck import smuggled_by_pax_size

TARBALL = "repos/Rocky8/smoke-patches-9.tar.gz"


def refused_before_any_vm(repo: Path, env: dict[str, str], release: str) -> str:
    """Build with --release: exit 1, one error line, no VM, nothing published; the line."""
    before = tree_snapshot(repo)
    qemu_before = qemu_pids(repo)
    proc = build_py(repo, "smoke", "--release", release, env=env)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "==> packer build" not in proc.stderr and "prepare source" not in proc.stderr
    assert qemu_pids(repo) <= qemu_before
    after = tree_snapshot(repo)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not {c for c in changed if not c.startswith("build/")}, changed
    return errors[0]


def publish(repo: Path, blob: bytes, release: str) -> str:
    target = repo / "mirror" / TARBALL
    target.write_bytes(blob)
    sha = hashlib.sha256(blob).hexdigest()
    write_release(repo, release, {"path": TARBALL, "sha256": sha, "size": len(blob)})
    return sha


def test_archive_read_differently_by_busybox_refused(repo: Path, mirror_http: str,
                                                     cache_env: dict[str, str]) -> None:
    """The old check called this 'a safe archive' and the smoke VM's busybox unpacked a
    setuid-root shell from it."""
    publish(repo, gzip.compress(smuggled_by_pax_size()), "7.0")
    line = refused_before_any_vm(repo, cache_env, "7.0")
    assert line == (f"error: {TARBALL}: refused: member 'notes.txt': PAX size 1024 but the "
                    "header says 0 (busybox reads the header)")


def test_compression_bomb_refused_on_the_host(repo: Path, mirror_http: str,
                                              cache_env: dict[str, str]) -> None:
    """100 MiB of zeros in 100 KiB: more than half the smoke disk (128M), refused while it is
    read, before any VM, and nothing of it is written out."""
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("advisories.txt")
        info.size = len(ADVISORIES)
        tar.addfile(info, io.BytesIO(ADVISORIES))
        info = tarfile.TarInfo("files/zeros")
        info.size = 100 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert len(raw.getvalue()) < 200_000
    publish(repo, raw.getvalue(), "7.1")
    t0 = time.monotonic()
    line = refused_before_any_vm(repo, cache_env, "7.1")
    seconds = time.monotonic() - t0
    assert line == (f"error: {TARBALL}: refused: members add up to more than 67108864 bytes "
                    "(half the image's disk_size 128M)")
    cache = Path(cache_env["XDG_CACHE_HOME"]) / "osimage" / "patches"
    assert not list(cache.glob("*.repack*")), list(cache.iterdir())
    print(f"\nbomb refused in {seconds:.1f} s (the whole ./build.py run)")


def test_render_hands_the_vm_the_repack(repo: Path, mirror_http: str,
                                        cache_env: dict[str, str], tmp_path: Path) -> None:
    blob = smoke_tarball(tmp_path / "p.tar.gz").read_bytes()
    sha = publish(repo, blob, "7.2")
    proc = build_py(repo, "render", "smoke", "--release", "7.2", env=cache_env)
    assert proc.returncode == 0, proc.stderr
    repack = Path(cache_env["XDG_CACHE_HOME"]) / "osimage" / "patches" / f"{sha}.repack.tar"
    repack_sha = hashlib.sha256(repack.read_bytes()).hexdigest()
    assert f"the VM gets a re-pack of exactly those members, sha256 {repack_sha}" in proc.stderr
    hcl = (repo / proc.stdout.strip()).read_text()
    assert f'source      = "{repack}"' in hcl or f'source = "{repack}"' in hcl, hcl
    # the environment goes to the VM as a file Packer uploads (osimage/build/render.py)
    env = next((repo / proc.stdout.strip()).parent.glob("provision/*-patches-apply.env"))
    assert f"export OSIMAGE_PATCHES_REPACK_SHA256={repack_sha}\n" in env.read_text()
    assert f"export OSIMAGE_PATCHES_SHA256={sha}\n" in env.read_text()
    listed = subprocess.run(["busybox", "tar", "-tvf", str(repack)], capture_output=True,
                            text=True, check=True).stdout.split("\n")
    assert [line.split()[-1] for line in listed if line] == [
        "advisories.txt", "files/", "files/patches/", "files/patches/level"]
    assert all(" root/root " in line for line in listed if line)


# --- repository metadata --------------------------------------------------------------------------


def repo_tarball(tmp: Path, rpms_dir: Path, checksum: str, tamper: str | None) -> Path:
    repo = tmp / f"repo-{checksum}-{tamper}"
    shutil.copytree(rpms_dir, repo)
    subprocess.run(["createrepo_c", "--general-compress-type=gz", f"--checksum={checksum}",
                    str(repo)], check=True, capture_output=True)
    (repo / "advisories.txt").write_bytes(ADVISORIES)
    first = sorted(repo.glob("*.rpm"))[0]
    if tamper == "changed":
        with first.open("ab") as f:
            f.write(b"\0")
    elif tamper == "symlink":  # the package is a link to a file elsewhere in the tarball
        os.replace(first, repo / "blob")
        os.symlink("blob", first)
    elif tamper == "hardlink":  # tar stores the later name as a hard link to the first
        os.link(first, repo / "0blob")
    elif tamper == "filelists":
        path = next((repo / "repodata").glob("*filelists.xml.gz"))
        path.write_bytes(gzip.compress(b"<filelists/>"))
    out = tmp / f"{repo.name}.tar.gz"
    subprocess.run(["tar", "-C", str(repo), "--owner=0", "--group=0", "--sort=name", "-czf",
                    str(out), "."], check=True)
    return out


def check_repo(path: Path) -> patchindex.PatchSet:
    contents = tarcheck.inspect(path, keep=patchindex.keep, digest=patchindex.digest)
    assert contents.problem is None, contents.problem

    def rehash(algorithm: str) -> dict[str, str]:
        return tarcheck.inspect(path, digest=patchindex.digest, algorithm=algorithm).digests

    return patchindex.read(contents, rehash)


@pytest.mark.parametrize("checksum", ["md5", "sha", "sha1", "sha224", "sha256", "sha384",
                                      "sha512"])
def test_every_createrepo_checksum_type_compared(tmp_path: Path, rpms: Path,
                                                 checksum: str) -> None:
    good = check_repo(repo_tarball(tmp_path, rpms, checksum, None))
    assert len(good.packages) == 2
    with pytest.raises(PatchContentError, match=r"osimage-test-a-1\.0-1\.el8\.noarch\.rpm: "
                       r"\w+ [0-9a-f]{12}\.\.\., the repository metadata says"):
        check_repo(repo_tarball(tmp_path, rpms, checksum, "changed"))


@pytest.mark.parametrize("tamper", ["symlink", "hardlink"])
def test_package_that_is_a_link_refused(tmp_path: Path, rpms: Path,
                                        tamper: str) -> None:
    with pytest.raises(PatchContentError, match=rf"osimage-test-a-1\.0-1\.el8\.noarch\.rpm is "
                       rf"a {tamper}, not a file"):
        check_repo(repo_tarball(tmp_path, rpms, "sha256", tamper))


def test_every_file_repomd_names_is_checked(tmp_path: Path, rpms: Path) -> None:
    with pytest.raises(PatchContentError, match=r"filelists\.xml\.gz: sha256 .*, "
                       r"repodata/repomd\.xml says"):
        check_repo(repo_tarball(tmp_path, rpms, "sha256", "filelists"))


# --- a damaged partial download -------------------------------------------------------------


@pytest.fixture
def range_mirror(repo: Path) -> Iterator[RangeServer]:
    """The repository's mirror/ served with Range support (as nginx serves a mirror)."""
    (repo / "mirror" / "repos" / "Rocky8").mkdir(parents=True)
    with RangeServer(repo / "mirror") as server:
        (repo / "site.yaml").write_text(f"mirror:\n  url: mirror\n  http: {server.url}\n")
        yield server


def test_damaged_partial_download_starts_over_once(repo: Path, range_mirror: RangeServer,
                                                   cache_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    blob = smoke_tarball(tmp_path / "p.tar.gz").read_bytes()
    sha = publish(repo, blob, "7.3")
    cache = Path(cache_env["XDG_CACHE_HOME"]) / "osimage" / "patches"
    cache.mkdir(parents=True)
    part = cache / f"{sha}.part"
    part.write_bytes(b"\xff" * 10 + blob[10:len(blob) // 2])  # a disk error in what was kept
    proc = build_py(repo, "render", "smoke", "--release", "7.3", env=cache_env)
    assert proc.returncode == 0, proc.stderr
    assert (f"{TARBALL}: the partial download kept in the cache ({part}) was damaged"
            in proc.stderr)
    assert "downloading it again from byte 0" in proc.stderr
    assert "refused" not in proc.stderr and "error:" not in proc.stderr
    assert [r for _, r in range_mirror.requests] == [f"bytes={len(blob) // 2}-", None]
    assert (cache / sha).read_bytes() == blob and not part.exists()


def test_a_wrong_file_downloaded_whole_blames_the_mirror_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRY_PAUSE", 0.0)
    (tmp_path / "m" / "repos").mkdir(parents=True)
    data = os.urandom(200_000)
    (tmp_path / "m" / "repos" / "p.tar").write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    wanted = hashlib.sha256(b"the file the release names").hexdigest()
    (cache / f"{wanted}.part").write_bytes(data[:1000])
    said: list[str] = []
    with RangeServer(tmp_path / "m") as server, pytest.raises(download.DownloadError) as err:
        download.fetch(download.Source(server.url), "repos/p.tar", wanted, None, cache,
                       said.append)
    assert "downloaded whole from the mirror" in str(err.value)
    assert len(said) == 1 and "was damaged" in said[0]
    assert [r for _, r in server.requests] == ["bytes=1000-", None]  # one restart, no more


# --- release set-patches --------------------------------------------------------------------


def published(repo: Path, tmp_path: Path) -> tuple[str, str, int]:
    """A tarball published as --create-patches publishes it: with .sha256 and index."""
    folder = repo / "mirror" / "repos" / "Rocky8"
    folder.mkdir(parents=True, exist_ok=True)
    tarball = smoke_tarball(folder / "smoke-patches-20261126.tar.gz")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    (folder / f"{tarball.name}.sha256").write_text(f"{sha}  {tarball.name}\n")
    (folder / "smoke-patches-20261126.index.json").write_text(json.dumps(
        {"name": tarball.name, "sha256": sha, "size": tarball.stat().st_size}))
    git(repo, "commit", "-q", "--allow-empty", "-m", "mirror")
    return f"repos/Rocky8/{tarball.name}", sha, tarball.stat().st_size


def manifest(repo: Path) -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="safe").load((repo / "manifests" / "manifest.yaml").read_text())


def test_set_patches_from_the_mirror(repo: Path, tmp_path: Path) -> None:
    path, sha, size = published(repo, tmp_path)
    proc = build_py(repo, "release", "set-patches", "8.0", path)
    assert proc.returncode == 0, proc.stderr
    assert manifest(repo)["releases"]["8.0"]["patches"] == {"path": path, "sha256": sha,
                                                             "size": size}
    assert f"patches: {path} sha256 {sha}" in proc.stdout
    # the same again is fine; a build of the release then fetches and checks it
    again = build_py(repo, "release", "set-patches", "8.0", path)
    assert again.returncode == 0, again.stderr


def one_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_set_patches_refuses_a_mismatch(repo: Path, tmp_path: Path) -> None:
    path, sha, size = published(repo, tmp_path)
    before = (repo / "manifests" / "manifest.yaml").read_bytes()
    folder = repo / "mirror" / "repos" / "Rocky8"
    name = path.rsplit("/", 1)[1]
    # the tarball was replaced after its .sha256 was written
    (folder / name).write_bytes((folder / name).read_bytes() + b"\0")
    line = one_error(build_py(repo, "release", "set-patches", "8.1", path), 1)
    assert f"{path}: sha256 " in line and f"{path}.sha256 says {sha[:16]}...; refused" in line
    shutil.copy(folder / name, tmp_path / "x")
    (folder / name).write_bytes((tmp_path / "x").read_bytes()[:-1])
    wrong = "0" * 64
    line = one_error(build_py(repo, "release", "set-patches", "8.1", path, "--sha256", wrong), 1)
    assert "--sha256 says 0000000000000000...; refused" in line
    line = one_error(build_py(repo, "release", "set-patches", "8.1", "repos/Rocky8/nope.tar.gz"),
                     1)
    assert "no repos/Rocky8/nope.tar.gz.sha256 beside it" in line
    line = one_error(build_py(repo, "release", "set-patches", "8.1", "../etc/passwd.tar"), 2)
    assert "PATH: a path on the mirror" in line
    assert (repo / "manifests" / "manifest.yaml").read_bytes() == before
    # a release that names another tarball keeps it unless --force
    write_release(repo, "8.2", {"path": "repos/Rocky8/older.tar.gz", "sha256": "1" * 64})
    line = one_error(build_py(repo, "release", "set-patches", "8.2", path), 1)
    assert "release 8.2 already names the patch tarball repos/Rocky8/older.tar.gz" in line
    forced = build_py(repo, "release", "set-patches", "8.2", path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert manifest(repo)["releases"]["8.2"]["patches"] == {"path": path, "sha256": sha,
                                                             "size": size}


def test_set_patches_over_http(repo: Path, tmp_path: Path, mirror_http: str) -> None:
    path, sha, _ = published(repo, tmp_path)
    proc = build_py(repo, "release", "set-patches", "8.3", path, "--mirror-url", mirror_http)
    assert proc.returncode == 0, proc.stderr
    assert manifest(repo)["releases"]["8.3"]["patches"]["sha256"] == sha
