"""Security patches: the tarball checks on real tarballs (one a dnf repository made with
createrepo_c from real RPMs), the downloader against a real HTTP server on 127.0.0.1 (resume,
cache, refusal), and real packer builds of the smoke image that create a patch tarball and then
apply it to a release build.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osimage.features import patchindex, tarcheck
from osimage.features.patchindex import PatchContentError
from osimage.publish import download
from tests.conftest import build_py, git, qemu_pids, tree_snapshot
from tests.servers import HTTPServer

P2_OFFSET = 67108864  # the smoke disk's data partition (scripts/make-smoke-disk.sh)
ADVISORIES = b"RLSA-2024:0001 Important/Sec. osimage-test-a-1.0-2.el8.noarch\n" \
             b"RLSA-2024:0002 Moderate/Sec. osimage-test-b-2:3.1-1.el8.noarch\n"


# --- making real tarballs ----------------------------------------------------------------------


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **info: Any) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data) if info.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    member.mode = 0o644
    for key, value in info.items():
        setattr(member, key, value)
    tar.addfile(member, io.BytesIO(data) if member.size else None)


Members = list[tuple[str, bytes, dict[str, Any]]]


def make_tar(path: Path, members: Members, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for name, data, info in members:
            add(tar, name, data, **info)
    return path


def smoke_tarball(path: Path) -> Path:
    """A patch tarball in the smoke image's format: advisories.txt and files/ for busybox."""
    return make_tar(path, [
        ("advisories.txt", b"SMOKE-2024:0042 Important/Sec. busybox-9.9.9.x86_64\n", {}),
        ("files", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("files/patches", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("files/patches/level", b"patched by the test\n", {}),
    ])


SPEC = """\
Name: {name}
Epoch: {epoch}
Version: {version}
Release: 1.el8
Summary: osimage test package
License: MIT
BuildArch: noarch
%description
A package for the patch tarball tests.
%install
mkdir -p %{{buildroot}}/usr/share/{name}
echo {version} > %{{buildroot}}/usr/share/{name}/version
%files
/usr/share/{name}/version
"""


@pytest.fixture(scope="session")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real RPMs, built with rpmbuild."""
    top = tmp_path_factory.mktemp("rpmbuild")
    for name, epoch, version in (("osimage-test-a", 0, "1.0"), ("osimage-test-b", 2, "3.1")):
        spec = top / f"{name}.spec"
        spec.write_text(SPEC.format(name=name, epoch=epoch, version=version))
        subprocess.run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}",
                        "--define", "_build_id_links none", str(spec)], check=True,
                       capture_output=True)
    return top / "RPMS" / "noarch"


def repo_tarball(tmp: Path, rpms: Path, *, tamper: str | None = None) -> Path:
    """A dnf repository tarball as rocky8-base's create step makes it: the RPMs, createrepo_c's
    repodata/ and advisories.txt (tamper: break it after createrepo_c ran)."""
    repo = tmp / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(rpms, repo)
    subprocess.run(["createrepo_c", "--general-compress-type=gz", str(repo)], check=True,
                   capture_output=True)
    (repo / "advisories.txt").write_bytes(ADVISORIES)
    first = sorted(repo.glob("*.rpm"))[0]
    if tamper == "changed":
        with first.open("ab") as f:
            f.write(b"\0")
    elif tamper == "missing":
        first.unlink()
    elif tamper == "extra":
        shutil.copy(first, repo / "extra-1.0-1.noarch.rpm")
    elif tamper == "no-repodata":
        shutil.rmtree(repo / "repodata")
    out = tmp / "repo.tar.gz"
    subprocess.run(["tar", "-C", str(repo), "--owner=0", "--group=0", "-czf", str(out), "."],
                   check=True)
    return out


def inspect(path: Path, **kw: Any) -> tarcheck.Contents:
    return tarcheck.inspect(path, keep=patchindex.keep, digest=patchindex.digest, **kw)


# --- the tarball checks ------------------------------------------------------------------------


def test_createrepo_tarball_is_safe_and_indexed(tmp_path: Path, rpms: Path) -> None:
    tarball = repo_tarball(tmp_path, rpms)
    contents = inspect(tarball)
    assert contents.problem is None
    assert contents.sha256 == hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert contents.size == tarball.stat().st_size and contents.compression == "gzip"
    patch_set = patchindex.read(contents)
    assert patch_set.has_repodata
    assert patch_set.packages == ("osimage-test-a-1.0-1.el8.noarch",
                                  "osimage-test-b-2:3.1-1.el8.noarch")
    assert [(a.id, a.type) for a in patch_set.advisories] == [
        ("RLSA-2024:0001", "Important/Sec."), ("RLSA-2024:0002", "Moderate/Sec.")]
    doc = patchindex.document(patch_set, name="x.tar.gz")
    assert json.loads(json.dumps(doc))["packages"] == list(patch_set.packages)
    assert doc["advisories"][1]["packages"] == ["osimage-test-b-2:3.1-1.el8.noarch"]


@pytest.mark.parametrize(("tamper", "expected"), [
    ("changed", "the repository metadata says"),
    ("missing", "which is not in the tarball"),
    ("extra", "not in its repository metadata"),
    ("no-repodata", "no repodata/repomd.xml"),
])
def test_inconsistent_repository_refused(tmp_path: Path, rpms: Path, tamper: str,
                                         expected: str) -> None:
    contents = inspect(repo_tarball(tmp_path, rpms, tamper=tamper))
    assert contents.problem is None  # a safe archive ...
    with pytest.raises(PatchContentError, match=expected):  # ... but not a whole repository
        patchindex.read(contents)


def test_advisories_required_and_parsed(tmp_path: Path) -> None:
    contents = inspect(make_tar(tmp_path / "a.tar.gz", [("files/x", b"x", {})]))
    with pytest.raises(PatchContentError, match=r"no advisories\.txt"):
        patchindex.read(contents)
    bad = make_tar(tmp_path / "b.tar.gz", [("advisories.txt", b"# c\n\nnot an advisory\n", {})])
    with pytest.raises(PatchContentError, match=r"advisories\.txt line 3"):
        patchindex.read(inspect(bad))


LINK = {"type": tarfile.SYMTYPE}
HARD = {"type": tarfile.LNKTYPE}


@pytest.mark.parametrize(("members", "expected"), [
    ([("/etc/passwd", b"x", {})], "absolute path"),
    ([("files/../../etc/passwd", b"x", {})], "'..' component"),
    ([("files/link", b"", {**LINK, "linkname": "/etc/shadow"})], "absolute path '/etc/shadow'"),
    ([("files/link", b"", {**LINK, "linkname": "../../etc"})], "points outside the archive"),
    ([("a", b"x", {}), ("files/hard", b"", {**HARD, "linkname": "../a"})],
     "hard link 'files/hard' points outside"),
    ([("files/hard", b"", {**HARD, "linkname": "etc/shadow"})], "not an earlier member"),
    # each link stays inside, but the second is reached through the first: deep/up is the root
    ([("deep/up", b"", {**LINK, "linkname": ".."}),
      ("deep/up/escape", b"", {**LINK, "linkname": "../x"})], "lies beneath the link 'deep/up'"),
    ([("dev/sda", b"", {"type": tarfile.BLKTYPE})], "is a device"),
    ([("dev/mem", b"", {"type": tarfile.CHRTYPE})], "is a device"),
    ([("pipe", b"", {"type": tarfile.FIFOTYPE})], "is a fifo"),
    ([("files/su", b"x", {"mode": 0o4755})], "setuid"),
    ([("bad\nname", b"x", {})], "control character"),
])
def test_unsafe_members_refused(tmp_path: Path, members: Members, expected: str) -> None:
    tarball = make_tar(tmp_path / "bad.tar.gz", [("advisories.txt", b"", {}), *members])
    contents = inspect(tarball)
    assert contents.problem is not None and expected in contents.problem
    assert contents.sha256 == hashlib.sha256(tarball.read_bytes()).hexdigest()


def test_links_inside_the_archive_are_fine(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "ok.tar", [
        ("files/a", b"a", {}),
        ("files/sub", b"", {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("files/sub/rel", b"", {**LINK, "linkname": "../a"}),
        ("files/hard", b"", {**HARD, "linkname": "./files/a"}),
    ], mode="w")
    contents = inspect(tarball)
    assert contents.problem is None and contents.compression == "none"
    assert contents.names == {"files/a", "files/sub/rel", "files/hard"}


def test_size_and_count_limits(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "big.tar.xz", [(f"f{i}", b"x" * 600, {}) for i in range(5)],
                       mode="w:xz")
    assert inspect(tarball).problem is None
    few = inspect(tarball, limits=tarcheck.Limits(max_members=4)).problem
    assert few == "more than 4 members"
    small = inspect(tarball, limits=tarcheck.Limits(max_total_bytes=2000)).problem
    assert small == "members add up to more than 2000 bytes"
    one = inspect(tarball, limits=tarcheck.Limits(max_member_bytes=500)).problem
    assert one is not None and "more than 500" in one


def cut(src: Path, dest: Path, size: int) -> Path:
    dest.write_bytes(src.read_bytes()[:size])
    return dest


def test_truncated_and_damaged_archives(tmp_path: Path) -> None:
    members: Members = [("advisories.txt", b"", {}), ("files/blob", os.urandom(200_000), {})]
    gz = make_tar(tmp_path / "p.tar.gz", members)
    xz = make_tar(tmp_path / "p.tar.xz", members, mode="w:xz")
    bz = make_tar(tmp_path / "p.tar.bz2", members, mode="w:bz2")
    plain = make_tar(tmp_path / "p.tar", members, mode="w")
    for good in (gz, xz, bz, plain):
        assert inspect(good).problem is None, good
    for damaged in (cut(gz, tmp_path / "c.tar.gz", gz.stat().st_size - 10),
                    cut(gz, tmp_path / "h.tar.gz", gz.stat().st_size // 2),
                    cut(xz, tmp_path / "c.tar.xz", xz.stat().st_size - 10),
                    cut(bz, tmp_path / "c.tar.bz2", bz.stat().st_size // 2)):
        problem = inspect(damaged).problem
        assert problem is not None and problem.startswith("truncated"), (damaged, problem)
    # a plain tar cut in a member's data, and exactly after it (no end-of-archive marker)
    data_end = 2 * 512 + 200_000 + (-200_000 % 512)  # two headers, the data, its padding
    assert inspect(cut(plain, tmp_path / "d.tar", 100_000)).problem == \
        "truncated: a member's data is cut short"
    assert inspect(cut(plain, tmp_path / "e.tar", data_end)).problem == \
        "truncated: the archive ends without its end-of-archive marker"
    garbled = tmp_path / "g.tar"
    garbled.write_bytes(plain.read_bytes()[:data_end] + os.urandom(1024))
    assert "garbled" in str(inspect(garbled).problem)
    (tmp_path / "empty").write_bytes(b"")
    assert inspect(tmp_path / "empty").problem == "empty file"
    (tmp_path / "text").write_bytes(b"not a tarball\n" * 100)
    assert str(inspect(tmp_path / "text").problem).startswith("not a tar archive")


# --- the downloader, against a real HTTP server ------------------------------------------------


class RangeServer:
    """http.server with Range support (as nginx or Apache serve a mirror), which can drop
    each response after cut_after bytes and records every request."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                target = server.directory / self.path.lstrip("/")
                if not target.is_file():
                    self.send_error(404)
                    return
                data = target.read_bytes()
                start = 0
                wanted = self.headers.get("Range")
                if wanted:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_after is not None:
                    body = body[:server.cut_after]
                    self.close_connection = True
                self.wfile.write(body)
                server.sent += len(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the client hanging up on a cut response is what the tests do

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def served(tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RangeServer, bytes, str]]:
    monkeypatch.setattr(download, "RETRY_PAUSE", 0.0)  # the pause between resumes only
    data = os.urandom(3 * 2**20 + 12345)
    folder = tmp_path / "mirror" / "repos" / "Rocky8"
    folder.mkdir(parents=True)
    (folder / "p.tar.gz").write_bytes(data)
    with RangeServer(tmp_path / "mirror") as server:
        yield server, data, hashlib.sha256(data).hexdigest()


PATH = "repos/Rocky8/p.tar.gz"


def test_download_resumes_a_broken_transfer(tmp_path: Path,
                                            served: tuple[RangeServer, bytes, str]) -> None:
    server, data, sha = served
    server.cut_after = 1_100_000  # every response breaks off after this many bytes
    said: list[str] = []
    got = download.fetch(download.Source(server.url), PATH, sha, len(data), tmp_path / "cache",
                         said.append)
    assert got.path.read_bytes() == data and got.downloaded == len(data)
    assert [r for _, r in server.requests] == [None, "bytes=1100000-", "bytes=2200000-"]
    assert server.sent == len(data)  # no byte was sent twice
    assert len(said) == 2 and "resuming at byte 1100000" in said[0]
    assert "connection closed early (1100000 bytes read" in said[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [sha, f"{sha}.lock"]


def test_download_resumed_by_the_next_build(tmp_path: Path,
                                            served: tuple[RangeServer, bytes, str]) -> None:
    server, data, sha = served
    cache = tmp_path / "cache"
    server.cut_after = 2**19
    with pytest.raises(download.DownloadError, match="the next build resumes there"):
        download.fetch(download.Source(server.url), PATH, sha, None, cache)
    part = cache / f"{sha}.part"
    assert part.read_bytes() == data[:3 * 2**19]
    server.cut_after, server.requests = None, []
    got = download.fetch(download.Source(server.url), PATH, sha, None, cache)
    assert got.resumed_at == 3 * 2**19 and got.downloaded == len(data) - 3 * 2**19
    assert server.requests == [(f"/{PATH}", f"bytes={3 * 2**19}-")]
    assert got.path.read_bytes() == data and not part.exists()

    # cached: a second build downloads nothing
    server.requests = []
    again = download.fetch(download.Source(server.url), PATH, sha, None, cache)
    assert again.from_cache and again.path == got.path and server.requests == []


def test_download_restarts_when_the_server_ignores_range(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "m" / "repos").mkdir(parents=True)
    (tmp_path / "m" / "repos" / "p.tar").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{sha}.part").write_bytes(b"stale bytes of another transfer")
    with HTTPServer(tmp_path / "m") as http:  # Python's http.server: no Range support
        got = download.fetch(download.Source(http.url), "repos/p.tar", sha, len(data), cache)
    assert got.path.read_bytes() == data


def test_download_refuses_the_wrong_file(tmp_path: Path,
                                         served: tuple[RangeServer, bytes, str]) -> None:
    server, _, sha = served
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(download.DownloadError, match=r"sha256 .* the release says 0000"):
        download.fetch(download.Source(server.url), PATH, wrong, None, cache)
    assert sorted(p.name for p in cache.iterdir()) == [f"{wrong}.lock"]  # nothing kept
    server.requests = []
    with pytest.raises(download.DownloadError, match=r"has \d+ bytes, the release says 10:"):
        download.fetch(download.Source(server.url), PATH, sha, 10, cache)
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.fetch(download.Source(server.url), "repos/Rocky8/nope.tar.gz", sha, None, cache)


def test_download_from_a_local_mirror_folder(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "m" / "repos").mkdir(parents=True)
    (tmp_path / "m" / "repos" / "p.tar").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    src = download.source_for({"mirror": {"url": str(tmp_path / "m")}}, tmp_path)
    assert not src.is_http and src.exists("repos/p.tar")
    got = download.fetch(src, "repos/p.tar", sha, len(data), tmp_path / "cache")
    assert got.path.read_bytes() == data


# --- end to end through ./build.py -------------------------------------------------------------


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    """A cache folder of the test's own (the patch cache starts empty), with the machine's
    accelerator and packer-version answers copied in so they are not probed again."""
    cache = tmp_path / "xdg-cache"
    (cache / "osimage").mkdir(parents=True)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "osimage"
    for name in ("accelerator.json", "packer-version.json"):
        if (home / name).is_file():
            shutil.copy(home / name, cache / "osimage" / name)
    return {"XDG_CACHE_HOME": str(cache)}


@pytest.fixture
def mirror_http(repo: Path) -> Iterator[str]:
    """The test repository's mirror/ served over HTTP; site.yaml (git-ignored) points at it."""
    (repo / "mirror" / "repos" / "Rocky8").mkdir(parents=True)
    with HTTPServer(repo / "mirror") as http:
        (repo / "site.yaml").write_text(f"mirror:\n  url: mirror\n  http: {http.url}\n")
        yield http.url


def write_release(repo: Path, name: str, patches: dict[str, Any] | None) -> None:
    body = "null" if patches is None else json.dumps(patches)
    (repo / "manifests" / "manifest.yaml").write_text(
        f"releases:\n  '{name}':\n    patches: {body}\n    images: {{}}\n")
    git(repo, "commit", "-q", "--allow-empty", "-am", f"release {name}")


def read_file(artifact: Path, tmp: Path, path: str) -> str:
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)], check=True)
    out = subprocess.run(["debugfs", "-R", f"cat {path}", f"{raw}?offset={P2_OFFSET}"],
                         check=True, capture_output=True, text=True)
    raw.unlink()
    return out.stdout


@pytest.mark.vm
def test_create_patches_then_apply_them_in_a_release_build(
        repo: Path, tmp_path: Path, mirror_http: str, cache_env: dict[str, str],
        no_leftover_qemu: None) -> None:
    commit = git(repo, "rev-parse", "HEAD").strip()
    # 1. --create-patches: the smoke VM makes the tarball, which is published with its index
    t0 = time.monotonic()
    made = build_py(repo, "smoke", "--create-patches", "--release", "5.0", env=cache_env)
    create_s = time.monotonic() - t0
    assert made.returncode == 0, made.stderr
    assert "--release 5.0 is ignored with --create-patches" in made.stderr
    assert "ok collect patch tarball (" in made.stderr
    assert "ok publish patch tarball (" in made.stderr
    assert "hash artifacts" not in made.stderr and "record in manifest.json" not in made.stderr
    day = time.strftime("%Y%m%d", time.gmtime())
    published = repo / "mirror" / "repos" / "Rocky8"
    name = f"smoke-patches-{day}.tar.gz"
    assert sorted(p.name for p in published.iterdir()) == sorted([
        name, f"{name}.sha256", f"smoke-patches-{day}.index.json",
        f"smoke-patches-{day}.index.json.sha256"])
    check = subprocess.run(["sha256sum", "-c", f"{name}.sha256"], cwd=published,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    sha = (published / f"{name}.sha256").read_text().split()[0]
    index = json.loads((published / f"smoke-patches-{day}.index.json").read_text())
    assert index["name"] == name and index["sha256"] == sha and index["git_commit"] == commit
    assert [a["id"] for a in index["advisories"]] == [f"SMOKE-{day[:4]}:0001",
                                                      f"SMOKE-{day[:4]}:0002"]
    assert index["packages"][0].startswith("busybox-")
    # its VM is no release image: not published, not recorded
    assert not (repo / "mirror" / "builds").exists() or not any(
        (repo / "mirror" / "builds").iterdir())
    assert not (repo / "images" / "smoke" / "manifest.json").exists()
    assert not (repo / "build" / "smoke" / f"g{commit[:10]}" / "output").exists()

    # 2. the release names that tarball; --release applies it before the image's provisioners
    write_release(repo, "5.0", {"path": f"repos/Rocky8/{name}", "sha256": sha,
                                "size": (published / name).stat().st_size})
    t0 = time.monotonic()
    built = build_py(repo, "smoke", "--release", "5.0", env=cache_env)
    apply_s = time.monotonic() - t0
    assert built.returncode == 0, built.stderr
    assert "ok security patches (" in built.stderr
    assert f"{name}: downloaded" in built.stderr and f"{name}: sha256 {sha} ok" in built.stderr
    hcl = (repo / "build" / "smoke" / "5.0" / "smoke.pkr.hcl").read_text()
    assert hcl.index("# patches-upload") < hcl.index("# patches-apply") < hcl.index("# marker")
    entry = json.loads((repo / "images" / "smoke" / "manifest.json").read_text())["builds"][-1]
    # the VM got the host's re-pack of the checked members, not the published bytes
    cache = Path(cache_env["XDG_CACHE_HOME"]) / "osimage" / "patches"
    repacked = hashlib.sha256((cache / f"{sha}.repack.tar").read_bytes()).hexdigest()
    assert entry["custom_data"]["patches"] == {"name": name, "sha256": sha,
                                               "repacked_sha256": repacked}
    assert entry["custom_data"]["release"] == "5.0"
    artifact = repo / "mirror" / "builds" / "smoke" / "5.0" / "smoke.qcow2"
    applied = read_file(artifact, tmp_path, "/patches-applied")
    assert f"name={name}\nsha256={sha}\nrepacked_sha256={repacked}\n" in applied
    assert f"SMOKE-{day[:4]}:0001 Important/Sec. busybox-" in applied
    level = read_file(artifact, tmp_path, "/patches/level")
    assert f"commit={commit}" in level  # the file the create step made, installed by apply
    assert "osimage smoke marker" in read_file(artifact, tmp_path, "/marker")
    assert (cache / sha).is_file()
    print(f"\ncreate-patches build {create_s:.1f} s, release build with patches {apply_s:.1f} s")


def test_render_with_and_without_patches(repo: Path, tmp_path: Path, mirror_http: str,
                                         cache_env: dict[str, str]) -> None:
    """`render --release X` fetches the tarball (a second time from the cache) and puts the
    apply step first; a release without patches renders the image's own steps only."""
    tarball = smoke_tarball(repo / "mirror" / "repos" / "Rocky8" / "smoke-patches-1.tar.gz")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    write_release(repo, "6.0", {"path": "repos/Rocky8/smoke-patches-1.tar.gz", "sha256": sha})
    first = build_py(repo, "render", "smoke", "--release", "6.0", env=cache_env)
    assert first.returncode == 0, first.stderr
    assert "smoke-patches-1.tar.gz: downloaded" in first.stderr
    second = build_py(repo, "render", "smoke", "--release", "6.0", env=cache_env)
    assert second.returncode == 0 and "smoke-patches-1.tar.gz: in the cache" in second.stderr
    # a damaged cached copy is noticed (its sha256 is checked on every use) and replaced
    cached = Path(cache_env["XDG_CACHE_HOME"]) / "osimage" / "patches" / sha
    cached.write_bytes(cached.read_bytes()[:-1] + b"!")
    third = build_py(repo, "render", "smoke", "--release", "6.0", env=cache_env)
    assert third.returncode == 0, third.stderr
    assert "the cached copy of smoke-patches-1.tar.gz was damaged" in third.stderr
    assert cached.read_bytes() == tarball.read_bytes()
    hcl = (repo / first.stdout.strip()).read_text()
    assert hcl.index("# patches-upload") < hcl.index("# patches-apply") < hcl.index("# marker")
    # the environment goes to the VM as a file Packer uploads (osimage/build/render.py)
    env = next((repo / first.stdout.strip()).parent.glob("provision/*-patches-apply.env"))
    assert f"export OSIMAGE_PATCHES_SHA256={sha}\n" in env.read_text()

    write_release(repo, "6.0", None)
    plain = build_py(repo, "render", "smoke", "--release", "6.0", env=cache_env)
    assert plain.returncode == 0, plain.stderr
    assert "release 6.0 names no patch tarball" in plain.stderr
    assert "patches-" not in (repo / plain.stdout.strip()).read_text()


@pytest.mark.parametrize("bad", ["sha256", "truncated", "unsafe"])
def test_bad_tarball_refused_before_any_vm(repo: Path, tmp_path: Path, mirror_http: str,
                                           cache_env: dict[str, str], bad: str) -> None:
    folder = repo / "mirror" / "repos" / "Rocky8"
    good = smoke_tarball(tmp_path / "good.tar.gz")
    target = folder / "smoke-patches-2.tar.gz"
    if bad == "sha256":
        shutil.copy(good, target)
        sha = hashlib.sha256(b"another tarball").hexdigest()
    elif bad == "truncated":  # recorded with the sha256 of the cut file: only the check sees it
        cut(good, target, good.stat().st_size - 20)
        sha = hashlib.sha256(target.read_bytes()).hexdigest()
    else:
        make_tar(target, [("advisories.txt", b"", {}), ("../../root/.ssh/authorized_keys",
                                                          b"ssh-ed25519 AAAA attacker", {})])
        sha = hashlib.sha256(target.read_bytes()).hexdigest()
    write_release(repo, "6.1", {"path": "repos/Rocky8/smoke-patches-2.tar.gz", "sha256": sha})
    before = tree_snapshot(repo)
    qemu_before = qemu_pids(repo)
    proc = build_py(repo, "smoke", "--release", "6.1", env=cache_env)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    expected = {"sha256": "the release says", "truncated": "refused: truncated",
                "unsafe": "refused: member '../../root/.ssh/authorized_keys' has a '..'"}[bad]
    assert expected in errors[0] and "smoke-patches-2.tar.gz" in errors[0]
    assert "==> packer build" not in proc.stderr and "prepare source" not in proc.stderr
    assert qemu_pids(repo) <= qemu_before
    after = tree_snapshot(repo)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not {c for c in changed if not c.startswith("build/")}, changed  # nothing published
    assert not list((repo / "build").glob("smoke/*/smoke.pkr.hcl"))


def test_create_patches_needs_a_create_step(repo: Path, cache_env: dict[str, str]) -> None:
    image = repo / "images" / "smoke" / "image.yaml"
    text = image.read_text()
    start = text.index("  create:\n")
    end = text.index("outputs:\n")
    image.write_text(text[:start] + text[end:])
    proc = build_py(repo, "smoke", "--create-patches", "--skip-commit", env=cache_env)
    assert proc.returncode == 2, proc.stderr
    assert "images/smoke/image.yaml: patches.create: smoke declares no create step" \
        in proc.stderr
    assert not (repo / "build" / "smoke").exists()


def test_render_create_patches_last_or_before(repo: Path, cache_env: dict[str, str]) -> None:
    """The create step and the download run last, or before the provisioner `before` names."""
    proc = build_py(repo, "render", "smoke", "--create-patches", env=cache_env)
    assert proc.returncode == 0, proc.stderr
    hcl = (repo / proc.stdout.strip()).read_text()
    assert hcl.index("# marker") < hcl.index("# patches-create") < hcl.index("# patches-download")
    assert 'direction   = "download"' in hcl and "patches-upload" not in hcl

    image = repo / "images" / "smoke" / "image.yaml"
    text = image.read_text()
    image.write_text(text.replace("    name: smoke-patches\n",
                                  "    name: smoke-patches\n    before: marker\n"))
    proc = build_py(repo, "render", "smoke", "--create-patches", env=cache_env)
    assert proc.returncode == 0, proc.stderr
    hcl = (repo / proc.stdout.strip()).read_text()
    assert hcl.index("# patches-create") < hcl.index("# patches-download") < hcl.index("# marker")

    image.write_text(text.replace("    name: smoke-patches\n",
                                  "    name: smoke-patches\n    before: markr\n"))
    proc = build_py(repo, "render", "smoke", env=cache_env)
    assert proc.returncode == 2
    assert "images/smoke/image.yaml: patches.create.before: 'markr' is not a provisioner" \
        in proc.stderr
