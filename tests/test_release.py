"""./build.py release record|set|verify|show|diff against a real HTTP mirror on 127.0.0.1.

Each test has its own git repository (manifest.json files written by hand, see test_tidy.py)
and a mirror folder served by Python's http.server; no part of osimage is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from osimage.release import commands as release
from tests.conftest import PROJECT, git
from tests.servers import HTTPServer, free_port
from tests.test_tidy import add_build, head, make_image_repo, run

MANIFEST = "manifests/manifest.yaml"

HAND_WRITTEN = """\
# Releases of the cluster (hand-written header).
releases:
  # the first release
  1.0.0:
    description: first   # trailing comment
    images:
      smoke:
        version: '1.0'
        git_commit: {commit}
        files:
          - {{path: builds/smoke/1.0/smoke.qcow2, size: {size}, sha256: {sha}}}

  # the second release, with its patches
  1.1.0:
    patches: null
    images:
      smoke:
        version: '1.0'     # same build as 1.0.0
        git_commit: {commit}
        files:
          - path: builds/smoke/1.0/smoke.qcow2
            size: {size}
            sha256: {sha}
# end of releases
"""


@dataclass
class Mirror:
    folder: Path
    url: str

    def file(self, path: str) -> Path:
        return self.folder / path


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_image_repo(tmp_path / "repo")
    monkeypatch.setenv("OSIMAGE_ROOT", str(root))
    return root


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    folder = tmp_path / "mirror"
    folder.mkdir()
    with HTTPServer(folder) as http:
        yield Mirror(folder, http.url)


def manifest_text(root: Path) -> str:
    return (root / MANIFEST).read_text()


def releases(root: Path) -> dict[str, Any]:
    m = release.load(root)
    return {name: m.get(name) for name in m.names}


def hand_written(root: Path, mirror: Mirror) -> str:
    """The HAND_WRITTEN manifest over a published smoke 1.0 build; returns its text."""
    entry = add_build(root, "smoke", "1.0", mirror=mirror.folder)
    text = HAND_WRITTEN.format(commit=entry["custom_data"]["git_commit"],
                               size=entry["files"][0]["size"],
                               sha=entry["custom_data"]["sha256"]["smoke.qcow2"])
    (root / MANIFEST).write_text(text)
    return text


def test_the_shipped_manifest_is_valid_and_empty() -> None:
    m = release.load(PROJECT)
    assert m.names == []
    assert manifest_text(PROJECT).startswith("# Release manifest")


def test_record_takes_the_latest_clean_build_of_each_image(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    smoke = add_build(repo, "smoke", "1.1", mirror=mirror.folder)
    add_build(repo, "smoke", "1.2", dirty=True, mirror=mirror.folder)
    base = add_build(repo, "base", "2.0", mirror=mirror.folder)
    before = manifest_text(repo)
    code, out, err = run(capsys, "release", "record", "2.0.0", "--mirror-url", mirror.url)
    assert code == 0, err
    assert "recorded release 2.0.0 in manifests/manifest.yaml" in out
    assert "smoke: builds/smoke/1.1/smoke.qcow2 matches mirror http://127.0.0.1:" in err
    rel = releases(repo)["2.0.0"]
    assert list(rel.images) == ["base", "smoke"]
    for image, build in (("smoke", smoke), ("base", base)):
        entry = rel.images[image]
        data = build["custom_data"]
        assert entry.version == data["version"]
        assert entry.git_commit == data["git_commit"] == head(repo)
        assert entry.files == (release.FileEntry(
            path=f"{data['mirror_path']}/{image}.qcow2", size=build["files"][0]["size"],
            sha256=data["sha256"][f"{image}.qcow2"]),)
    # the header comment and everything before the releases stay as they were
    text = manifest_text(repo)
    prefix = before[:before.index("releases: {}")]
    assert text.startswith(prefix + "releases:\n  2.0.0:\n    images:\n      base:\n")
    assert "          - path: builds/smoke/1.1/smoke.qcow2\n" in text


def test_record_refuses_an_image_without_a_clean_build(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    """A named image must have one; without names it is skipped (test_manifest_honest.py)."""
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    before = manifest_text(repo)
    record = ("release", "record", "2.0.0", "smoke", "base", "--mirror-url", mirror.url)
    code, _, err = run(capsys, *record)
    assert code == 1
    assert "error: images/base/manifest.json: no clean build of base to record (no builds)" in err
    add_build(repo, "base", "2.0", dirty=True, mirror=mirror.folder)
    code, _, err = run(capsys, *record)
    assert code == 1
    assert "no clean build of base to record (1 build, none clean)" in err
    assert manifest_text(repo) == before
    # naming the images to record leaves base out
    assert run(capsys, "release", "record", "2.0.0", "smoke", "--mirror-url", mirror.url)[0] == 0
    assert list(releases(repo)["2.0.0"].images) == ["smoke"]


def test_record_refuses_an_existing_release_unless_forced(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    text = hand_written(repo, mirror)
    add_build(repo, "smoke", "1.1", mirror=mirror.folder)
    code, _, err = run(capsys, "release", "record", "1.0.0", "smoke", "--mirror-url", mirror.url)
    assert code == 1
    assert "error: manifests/manifest.yaml: release 1.0.0 is already recorded" in err
    assert "--force" in err
    assert manifest_text(repo) == text
    code, _, err = run(capsys, "release", "record", "1.0.0", "smoke", "--force",
                       "--mirror-url", mirror.url)
    assert code == 0, err
    assert releases(repo)["1.0.0"].images["smoke"].version == "1.1"
    new = manifest_text(repo)
    # only the entry changed: the text before it and from the next release on is untouched
    start = text.index("        version: '1.0'\n")
    end = text.index("\n  # the second release")
    assert new[:start] == text[:start]
    assert new.endswith(text[end:])
    assert new[start:len(new) - len(text) + end] == (
        "        version: '1.1'\n"
        f"        git_commit: {head(repo)}\n"
        "        files:\n"
        "          - {path: builds/smoke/1.1/smoke.qcow2, "
        f"size: {mirror.file('builds/smoke/1.1/smoke.qcow2').stat().st_size}, "
        f"sha256: {hashlib.sha256(mirror.file('builds/smoke/1.1/smoke.qcow2').read_bytes()).hexdigest()}}}\n")  # noqa: E501


def test_a_new_release_is_appended_leaving_the_rest_byte_for_byte(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    text = hand_written(repo, mirror)
    code, _, err = run(capsys, "release", "record", "1.2.0", "smoke", "--mirror-url", mirror.url)
    assert code == 0, err
    new = manifest_text(repo)
    # the comment at the end of the file stays at the end (test_manifest_honest.py)
    body = text.removesuffix("# end of releases\n")
    assert new.startswith(body) and new.endswith("\n# end of releases\n")
    assert new[len(body):].startswith("  1.2.0:\n    images:\n      smoke:\n")
    assert list(releases(repo)) == ["1.0.0", "1.1.0", "1.2.0"]


def test_bad_names_are_bad_input(repo: Path, mirror: Mirror,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = manifest_text(repo)
    code, _, err = run(capsys, "release", "record", "2.0.0", "smok", "--mirror-url", mirror.url)
    assert code == 2
    assert "unknown image 'smok': no images/smok/image.yaml (did you mean 'smoke'?)" in err
    code, _, err = run(capsys, "release", "record", "2.0/0", "--mirror-url", mirror.url)
    assert code == 2
    assert "release '2.0/0' is not a valid release name" in err
    assert manifest_text(repo) == before


@pytest.mark.parametrize("damage", ["content", "size", "missing"])
def test_record_refuses_a_file_that_differs_on_the_mirror(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    disk = mirror.file("builds/smoke/1.0/smoke.qcow2")
    if damage == "content":
        body = bytearray(disk.read_bytes())
        body[100] ^= 0xFF
        disk.write_bytes(bytes(body))
    elif damage == "size":
        disk.write_bytes(disk.read_bytes() + b"x")
    else:
        disk.unlink()
    before = manifest_text(repo)
    code, _, err = run(capsys, "release", "record", "2.0.0", "smoke", "--mirror-url", mirror.url)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "smoke: builds/smoke/1.0/smoke.qcow2: " in errors[0]
    assert {"content": "sha256", "size": "size", "missing": "missing"}[damage] in errors[0]
    assert "not recorded" in errors[0]
    assert manifest_text(repo) == before


def test_set_one_image_from_its_builds(repo: Path, mirror: Mirror,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    one = add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    add_build(repo, "smoke", "1.1", mirror=mirror.folder)
    add_build(repo, "smoke", "1.2", dirty=True, mirror=mirror.folder)
    before = manifest_text(repo)
    code, _, err = run(capsys, "release", "set", "2.0.0", "smoke", "--version", "1.2-dirty",
                       "--mirror-url", mirror.url)
    assert code == 1
    assert "-dirty build" in err
    code, _, err = run(capsys, "release", "set", "2.0.0", "smoke", "--version", "0.9",
                       "--mirror-url", mirror.url)
    assert code == 2
    assert "no build of smoke with version '0.9' (versions: 1.0, 1.1, 1.2-dirty)" in err
    assert manifest_text(repo) == before
    code, out, err = run(capsys, "release", "set", "2.0.0", "smoke", "--version", "1.0",
                         "--mirror-url", mirror.url)
    assert code == 0, err
    assert "set smoke 1.0 in release 2.0.0" in out
    assert releases(repo)["2.0.0"].images["smoke"].files[0].sha256 == \
        one["custom_data"]["sha256"]["smoke.qcow2"]
    # the entry exists now: replacing it needs --force
    code, _, err = run(capsys, "release", "set", "2.0.0", "smoke", "--mirror-url", mirror.url)
    assert code == 1
    assert "release 2.0.0 already has an entry for smoke" in err
    code, _, err = run(capsys, "release", "set", "2.0.0", "smoke", "--force",
                       "--mirror-url", mirror.url)
    assert code == 0, err
    assert releases(repo)["2.0.0"].images["smoke"].version == "1.1"  # the latest clean build


def test_set_by_hand(repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    disk = mirror.file("builds/base/7.0/base.qcow2")
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"base disk\n" * 5000)
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    commit = head(repo)
    before = manifest_text(repo)
    by_hand = ["release", "set", "3.0.0", "base", "--version", "7.0", "--commit", commit[:8],
               "--file", "base.qcow2", "--mirror-url", mirror.url]
    code, _, err = run(capsys, *by_hand, "--sha256", "ab" * 32)
    assert code == 1
    assert (f"error: builds/base/7.0/base.qcow2: sha256 {digest[:12]}... on the mirror, "
            "abababababab... given; not recorded") in err
    code, _, err = run(capsys, "release", "set", "3.0.0", "base", "--version", "7.0",
                       "--commit", "0" * 40, "--file", "base.qcow2", "--mirror-url", mirror.url)
    assert code == 2
    assert "--commit: '" + "0" * 40 + "' is not a commit of this repository" in err
    code, _, err = run(capsys, "release", "set", "3.0.0", "base", "--version", "7.0-dirty",
                       "--commit", commit, "--file", "base.qcow2", "--mirror-url", mirror.url)
    assert code == 1
    assert "-dirty build" in err
    assert manifest_text(repo) == before
    code, _, err = run(capsys, *by_hand, "--sha256", digest.upper())
    assert code == 0, err
    entry = releases(repo)["3.0.0"].images["base"]
    assert entry == release.ImageEntry(version="7.0", git_commit=commit, files=(
        release.FileEntry("builds/base/7.0/base.qcow2", disk.stat().st_size, digest),))


def test_verify_prints_a_table_and_fails_on_a_mismatch(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    add_build(repo, "base", "2.0", mirror=mirror.folder)
    assert run(capsys, "release", "record", "2.0.0", "--mirror-url", mirror.url)[0] == 0
    code, out, err = run(capsys, "release", "verify", "2.0.0", "--mirror-url", mirror.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "FILE", "SIZE", "SHA256", "STATUS"]
    assert lines[1].split()[:2] == ["base", "builds/base/2.0/base.qcow2"]
    assert lines[1].endswith("  ok") and lines[2].endswith("  ok")
    assert lines[3] == f"release 2.0.0: all 2 files match mirror {mirror.url}"

    disk = mirror.file("builds/smoke/1.0/smoke.qcow2")
    disk.write_bytes(disk.read_bytes()[::-1])  # same size, other bytes
    before = manifest_text(repo)
    code, out, err = run(capsys, "release", "verify", "2.0.0", "--mirror-url", mirror.url)
    assert code == 1
    assert out.splitlines()[1].endswith("  ok")
    assert "builds/smoke/1.0/smoke.qcow2" in out.splitlines()[2]
    assert "sha256" in out.splitlines()[2] and "on the mirror" in out.splitlines()[2]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: release 2.0.0: 1 of 2 files do not match mirror {mirror.url}: "
                      f"builds/smoke/1.0/smoke.qcow2 ({out.splitlines()[2].split('  ')[-1]})"]
    disk.unlink()
    code, out, err = run(capsys, "release", "verify", "2.0.0", "--mirror-url", mirror.url)
    assert code == 1
    assert out.splitlines()[2].endswith("missing on the mirror")
    assert manifest_text(repo) == before


def test_verify_checks_the_patch_tarball_too(repo: Path, mirror: Mirror,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    hand_written(repo, mirror)
    tarball = mirror.file("repos/Rocky8/security-2024.tar.gz")
    tarball.parent.mkdir(parents=True)
    tarball.write_bytes(b"patches" * 999)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    path = repo / MANIFEST
    path.write_text(path.read_text().replace(
        "    patches: null\n",
        f"    patches: {{path: repos/Rocky8/security-2024.tar.gz, sha256: {digest}}}\n"))
    code, out, err = run(capsys, "release", "verify", "1.1.0", "--mirror-url", mirror.url)
    assert code == 0, err
    assert out.splitlines()[2].split() == ["(patches)", "repos/Rocky8/security-2024.tar.gz", "?",
                                           digest[:12], "ok"]
    code, out, _ = run(capsys, "release", "diff", "1.0.0", "1.1.0")
    assert out.splitlines()[-1] == (f"~ patches: none -> repos/Rocky8/security-2024.tar.gz "
                                    f"({digest[:12]})")
    tarball.write_bytes(b"other")
    code, _, err = run(capsys, "release", "verify", "1.1.0", "--mirror-url", mirror.url)
    assert code == 1
    assert "repos/Rocky8/security-2024.tar.gz (sha256 " in err


def test_verify_reads_a_local_mirror_folder_without_http(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The embedded site has no mirror.http: mirror/ at the root is read directly."""
    folder = repo / "mirror"
    add_build(repo, "smoke", "1.0", mirror=folder)
    code, _, err = run(capsys, "release", "record", "2.0.0", "smoke")
    assert code == 0, err
    code, out, _ = run(capsys, "release", "verify", "2.0.0")
    assert code == 0
    assert f"match local mirror {folder}" in out
    (folder / "builds/smoke/1.0/smoke.qcow2").write_bytes(b"other")
    code, out, _ = run(capsys, "release", "verify", "2.0.0")
    assert code == 1
    assert "size 5 on the mirror" in out


def test_an_unreachable_mirror_is_one_line(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    before = manifest_text(repo)
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "release", "record", "2.0.0", "smoke", "--mirror-url", url)
    assert code == 1
    assert err.startswith(f"error: mirror {url}: cannot connect to get "
                          "builds/smoke/1.0/smoke.qcow2: ")
    assert len(err.splitlines()) == 1
    assert manifest_text(repo) == before


def test_show_and_diff(repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "release", "show")
    assert (code, out) == (0, "no releases in manifests/manifest.yaml yet\n")
    hand_written(repo, mirror)
    new = add_build(repo, "smoke", "1.1", mirror=mirror.folder)
    add_build(repo, "base", "2.0", mirror=mirror.folder)
    assert run(capsys, "release", "record", "1.2.0", "--mirror-url", mirror.url)[0] == 0

    code, out, _ = run(capsys, "release", "show")
    assert code == 0
    assert out.splitlines() == ["RELEASE  IMAGES", "1.0.0    smoke 1.0", "1.1.0    smoke 1.0",
                                "1.2.0    base 2.0, smoke 1.1"]
    code, out, _ = run(capsys, "release", "show", "1.2.0")
    assert code == 0
    assert out.splitlines()[0].split() == ["IMAGE", "VERSION", "COMMIT", "FILE", "SIZE", "SHA256"]
    assert out.splitlines()[2].split() == [
        "smoke", "1.1", new["custom_data"]["git_commit"][:10], "builds/smoke/1.1/smoke.qcow2",
        str(new["files"][0]["size"]), new["custom_data"]["sha256"]["smoke.qcow2"]]
    code, out, _ = run(capsys, "release", "show", "1.2.0", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "1.2.0" and data["patches"] is None
    assert data["images"]["smoke"]["files"][0]["path"] == "builds/smoke/1.1/smoke.qcow2"

    code, out, _ = run(capsys, "release", "diff", "1.0.0", "1.2.0")
    assert code == 0
    commit = new["custom_data"]["git_commit"][:10]
    was = releases(repo)["1.0.0"].images["smoke"].files[0].sha256
    assert out.splitlines() == [
        f"~ smoke: 1.0 (commit {commit}) -> 1.1 (commit {commit})",
        f"    ~ smoke.qcow2: sha256 {was[:12]} -> "
        f"{new['custom_data']['sha256']['smoke.qcow2'][:12]}, 10000 B -> 10000 B",
        f"+ base: 2.0 (commit {commit})",
        "  smoke packages: no package list recorded for smoke in release 1.0.0",
    ]
    code, out, _ = run(capsys, "release", "diff", "1.0.0", "1.1.0")
    assert (code, out) == (0, f"  smoke: 1.0 (commit {commit})\n"
                              "  smoke packages: no package list recorded for smoke in release "
                              "1.0.0\n")

    code, _, err = run(capsys, "release", "show", "1.2")
    assert code == 2
    assert "no release '1.2'" in err and "did you mean '1.2.0'" in err
    assert run(capsys, "release", "diff", "1.0.0", "9.9")[0] == 2


@pytest.mark.parametrize(("text", "message"), [
    ("releases:\n  1.0.0:\n    imagez: {}\n",
     "manifests/manifest.yaml: releases.1.0.0.imagez: unknown key 'imagez' (did you mean "
     "'images'?) (and 1 more problem)\n  manifests/manifest.yaml: releases.1.0.0.images: "
     "missing required key 'images'"),
    ("releases:\n  2.4:\n    images: {}\n",
     "manifests/manifest.yaml: releases.2.4: a release name must be a string (write '2.4' in "
     "quotes)"),
    ("releases:\n  1.0.0:\n    images:\n      smoke: {version: '1', git_commit: abc, files: []}\n",
     "manifests/manifest.yaml: releases.1.0.0.images.smoke.files: [] should be non-empty"),
    ("releases: [\n", "manifests/manifest.yaml:2:1: not valid YAML"),
    ("releases:\n", "manifests/manifest.yaml: releases: must be an object, not nothing"),
])
def test_an_invalid_manifest_is_bad_input(repo: Path, capsys: pytest.CaptureFixture[str],
                                          text: str, message: str) -> None:
    (repo / MANIFEST).write_text(text)
    code, _, err = run(capsys, "release", "show")
    assert code == 2
    assert err.startswith(f"error: {message}")


def test_writes_wait_for_the_lock(repo: Path, mirror: Mirror,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    before = manifest_text(repo)
    codes: list[int] = []
    lock = FileLock(str(release.lock_for(repo)))
    with lock:
        worker = threading.Thread(target=lambda: codes.append(release_set(mirror)))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive()
        assert manifest_text(repo) == before
    worker.join(timeout=30)
    assert codes == [0]
    assert "2.0.0" in releases(repo)
    # the lock lives in the git directory, so it never makes the next build -dirty
    assert git(repo, "ls-files", "--others", "--exclude-standard", "manifests") == ""


def release_set(mirror: Mirror, name: str = "2.0.0") -> int:
    from osimage.cli import main

    return main(["release", "set", name, "smoke", "--mirror-url", mirror.url])


def test_concurrent_writers_lose_no_update(repo: Path, mirror: Mirror,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    names = [f"{i}.0.0" for i in range(8)]
    codes: list[int] = []
    workers = [threading.Thread(target=lambda n=n: codes.append(release_set(mirror, n)))
               for n in names]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert codes == [0] * len(names)
    assert sorted(releases(repo)) == names


def test_writes_are_atomic(repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    path = repo / MANIFEST
    inode = path.stat().st_ino
    assert run(capsys, "release", "record", "2.0.0", "smoke", "--mirror-url", mirror.url)[0] == 0
    assert path.stat().st_ino != inode  # a new file renamed into place
    assert os.listdir(path.parent) == ["manifest.yaml"]


def test_a_release_lock_that_cannot_be_taken_is_one_line(
        repo: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    """The lock of manifests/manifest.yaml is a folder: one error line, no traceback."""
    add_build(repo, "smoke", "1.0", mirror=mirror.folder)
    before = manifest_text(repo)
    lock = release.lock_for(repo)
    lock.unlink(missing_ok=True)
    lock.mkdir(parents=True)
    code = release_set(mirror)
    err = capsys.readouterr().err
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: cannot take the lock {lock}: Is a directory"]
    assert "Traceback" not in err and manifest_text(repo) == before
