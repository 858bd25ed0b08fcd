"""./build.py tidy [IMAGE...] [--check]: manifest.json reduced to the latest clean build.

The repositories are real git repositories in a temp folder; manifest.json files are written
by hand in the format pipeline.manifest_entry() makes. test_release.py uses the same helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from osimage.cli import main
from osimage.release import image_manifest as manifest
from tests.conftest import PROJECT, git


def make_image_repo(path: Path, images: tuple[str, ...] = ("base", "smoke")) -> Path:
    """A git repository with a stub image.yaml per image and the project's manifest.yaml
    (not a clone of the project: these tests must not change when images are added)."""
    path.mkdir(parents=True)
    for name in images:
        (path / "images" / name).mkdir(parents=True)
        (path / "images" / name / "image.yaml").write_text(f"description: {name}\n")
    (path / "manifests").mkdir()
    shutil.copy(PROJECT / "manifests" / "manifest.yaml", path / "manifests" / "manifest.yaml")
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.invalid")
    git(path, "config", "user.name", "test")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "fixture")
    return path


def head(root: Path) -> str:
    return git(root, "rev-parse", "HEAD").strip()


def add_build(root: Path, image: str, version: str, *, dirty: bool = False,
              mirror: Path | None = None, content: bytes | None = None) -> dict[str, Any]:
    """Append a build to images/IMAGE/manifest.json; with mirror, publish its disk there."""
    if dirty and not version.endswith("-dirty"):
        version += "-dirty"
    name = f"{image}.qcow2"
    body = content if content is not None else f"{image} {version} ".encode() * 1000
    if mirror is not None:
        folder = mirror / "builds" / image / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
    entry = {
        "name": image,
        "builder_type": "qemu",
        "build_time": 1_700_000_000,
        "files": [{"name": name, "size": len(body)}],
        "artifact_id": "VM",
        "packer_run_uuid": str(uuid.uuid4()),
        "custom_data": {
            "version": version,
            "release": None,
            "git_commit": head(root),
            "dirty": dirty,
            "sha256": {name: hashlib.sha256(body).hexdigest()},
            "mirror_path": f"builds/{image}/{version}",
            "inputs_sha256": "0" * 64,
            "accelerator": "tcg",
            "osimage_version": "0.1.0",
        },
    }
    manifest.append_build(root / "images" / image / "manifest.json", entry)
    return entry


def read_manifest(root: Path, image: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "images" / image / "manifest.json").read_text())
    return data


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_image_repo(tmp_path / "repo")
    monkeypatch.setenv("OSIMAGE_ROOT", str(root))
    return root


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_tidy_keeps_the_latest_clean_build(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    keep = add_build(repo, "smoke", "1.1")
    add_build(repo, "smoke", "1.2", dirty=True)
    code, out, _ = run(capsys, "tidy", "--check")
    assert code == 1
    code, out, _ = run(capsys, "tidy")
    assert code == 0
    assert "images/smoke/manifest.json: kept 1.1" in out and "dropped 2 builds" in out
    data = read_manifest(repo, "smoke")
    assert data == {"builds": [keep], "last_run_uuid": keep["packer_run_uuid"]}
    code, out, _ = run(capsys, "tidy", "--check")
    assert code == 0
    assert "images/smoke/manifest.json: tidy (1.1" in out


def test_check_fails_naming_each_untidy_manifest(repo: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    add_build(repo, "smoke", "1.1")
    add_build(repo, "base", "2.0")
    before = {i: (repo / "images" / i / "manifest.json").read_bytes() for i in ("smoke", "base")}
    code, _, err = run(capsys, "tidy", "--check")
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "images/smoke/manifest.json (2 builds, keep 1: 1.1" in lines[0]
    assert "base" not in lines[0]
    assert "./build.py tidy" in err
    assert {i: (repo / "images" / i / "manifest.json").read_bytes() for i in before} == before


def test_check_sees_a_wrong_last_run_uuid(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    path = repo / "images" / "smoke" / "manifest.json"
    data = json.loads(path.read_text())
    data["last_run_uuid"] = str(uuid.uuid4())
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, "tidy", "--check", "smoke")
    assert code == 1
    assert "last_run_uuid does not name its build" in err
    assert run(capsys, "tidy", "smoke")[0] == 0
    assert run(capsys, "tidy", "--check", "smoke")[0] == 0


def test_tidy_refuses_an_image_with_no_clean_build_and_changes_nothing(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    add_build(repo, "smoke", "1.1")
    add_build(repo, "base", "2.0", dirty=True)
    before = {i: (repo / "images" / i / "manifest.json").read_bytes() for i in ("smoke", "base")}
    code, _, err = run(capsys, "tidy")
    assert code == 1
    assert "no clean build to keep in images/base/manifest.json" in err
    assert {i: (repo / "images" / i / "manifest.json").read_bytes() for i in before} == before
    code, _, err = run(capsys, "tidy", "--check", "base")
    assert code == 1
    assert "1 build, none clean" in err
    # naming only the image that can be tidied works
    assert run(capsys, "tidy", "smoke")[0] == 0
    assert len(read_manifest(repo, "smoke")["builds"]) == 1


def test_a_tidy_manifest_is_not_rewritten(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    path = repo / "images" / "smoke" / "manifest.json"
    before = path.stat()
    code, out, _ = run(capsys, "tidy")
    assert code == 0
    assert "already tidy" in out
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_tidy_writes_atomically_and_keeps_other_keys(repo: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    add_build(repo, "smoke", "1.0")
    keep = add_build(repo, "smoke", "1.1")
    path = repo / "images" / "smoke" / "manifest.json"
    data = json.loads(path.read_text())
    data["note"] = "kept"
    path.write_text(json.dumps(data))
    inode = path.stat().st_ino
    assert run(capsys, "tidy", "smoke")[0] == 0
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert read_manifest(repo, "smoke") == {"builds": [keep],
                                            "last_run_uuid": keep["packer_run_uuid"],
                                            "note": "kept"}
    assert sorted(os.listdir(path.parent)) == ["image.yaml", "manifest.json",
                                               "manifest.json.lock"]


def test_bad_input_exits_2(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "tidy", "smok")
    assert code == 2
    assert "unknown image 'smok': no images/smok/image.yaml (did you mean 'smoke'?)" in err
    (repo / "images" / "smoke" / "manifest.json").write_text("{not json")
    code, _, err = run(capsys, "tidy", "--check")
    assert code == 2
    assert "images/smoke/manifest.json: not valid JSON" in err


def test_no_manifests_is_tidy(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "tidy", "--check") == (0, "", "")
    assert run(capsys, "tidy") == (0, "", "")


def test_a_manifest_lock_that_cannot_be_taken_is_one_line(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lock of images/IMAGE/manifest.json is a folder: one error line naming it, no
    traceback, the manifest unchanged."""
    add_build(repo, "smoke", "1.0")
    add_build(repo, "smoke", "1.1", dirty=True)
    path = repo / "images" / "smoke" / "manifest.json"
    before = path.read_bytes()
    lock = manifest.lock_path(path)
    lock.unlink(missing_ok=True)
    lock.mkdir()
    code, _, err = run(capsys, "tidy")
    assert code == 1
    assert err.splitlines()[0] == f"error: cannot take the lock {lock}: Is a directory"
    assert "Traceback" not in err
    assert path.read_bytes() == before


def test_a_held_manifest_lock_times_out_naming_the_file(
        repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from filelock import FileLock

    add_build(repo, "smoke", "1.0")
    add_build(repo, "smoke", "1.1", dirty=True)
    path = repo / "images" / "smoke" / "manifest.json"
    monkeypatch.setattr(manifest, "LOCK_TIMEOUT", 1.0)
    with FileLock(str(manifest.lock_path(path))):
        code, _, err = run(capsys, "tidy")
    assert code == 1
    assert err.splitlines()[0] == (f"error: {path}: still locked by another command after 1 s "
                                   f"({manifest.lock_path(path)})")
