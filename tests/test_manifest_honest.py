"""Manifests stay honest: a --no-publish build is recorded as such and never preferred to a
published one; `release record` without names records what it can and names what it skipped;
edits of manifests/manifest.yaml keep every comment where it was; a mirror that is down is
one clear line.

The --no-publish tests run real smoke builds (packer + qemu) in a clone of the project; the
others write images/IMAGE/manifest.json by hand in the format pipeline.manifest_entry() makes
and serve the mirror with Python's http.server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from osimage.release import commands as release
from osimage.release import image_manifest as manifest
from tests.conftest import PROJECT, build_py, git
from tests.servers import HTTPServer
from tests.test_tidy import head, make_image_repo, run

MANIFEST = "manifests/manifest.yaml"


def builds(root: Path, image: str) -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads((root / "images" / image / "manifest.json").read_text())
    return list(data["builds"])


# --- --no-publish, with real builds --------------------------------------------------------------


@pytest.mark.vm
def test_a_no_publish_build_is_recorded_as_such_and_never_preferred(
        repo: Path, no_leftover_qemu: None) -> None:
    first = build_py(repo, "smoke", "--release", "1.0")
    assert first.returncode == 0, first.stderr
    commit1 = git(repo, "rev-parse", "HEAD").strip()
    # a later commit, built again as the same version but not published
    (repo / "NOTES.txt").write_text("a change after the published build\n")
    git(repo, "add", "NOTES.txt")
    git(repo, "commit", "-q", "-m", "later")
    second = build_py(repo, "smoke", "--release", "1.0", "--no-publish")
    assert second.returncode == 0, second.stderr

    published, unpublished = builds(repo, "smoke")
    assert published["custom_data"]["published"] is True
    assert published["custom_data"]["mirror_path"] == "builds/smoke/1.0"
    assert unpublished["custom_data"]["published"] is False
    assert unpublished["custom_data"]["mirror_path"] is None
    assert unpublished["custom_data"]["git_commit"] != commit1
    on_mirror = repo / "mirror" / "builds" / "smoke" / "1.0" / "smoke.qcow2"
    assert hashlib.sha256(on_mirror.read_bytes()).hexdigest() == \
        published["custom_data"]["sha256"]["smoke.qcow2"]

    # release set by version and release record without names take the published build
    done = build_py(repo, "release", "set", "0.9.0", "smoke", "--version", "1.0")
    assert done.returncode == 0, done.stderr
    done = build_py(repo, "release", "record", "1.0.0")
    assert done.returncode == 0, done.stderr
    assert "recorded release 1.0.0" in done.stdout
    skipped = [line for line in done.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1
    assert "rocky8-base (no builds)" in skipped[0] and "usb-installer (no builds)" in skipped[0]
    for name in ("0.9.0", "1.0.0"):
        shown = build_py(repo, "release", "show", name, "--json")
        entry = json.loads(shown.stdout)["images"]["smoke"]
        assert entry["git_commit"] == commit1
        assert entry["files"][0]["sha256"] == published["custom_data"]["sha256"]["smoke.qcow2"]
    assert build_py(repo, "release", "verify", "1.0.0").returncode == 0

    # tidy keeps the published build, though the unpublished one is later
    done = build_py(repo, "tidy", "smoke")
    assert done.returncode == 0, done.stderr
    assert f"kept 1.0 (run {published['packer_run_uuid']}), dropped 1 build" in done.stdout
    assert builds(repo, "smoke") == [published]


@pytest.mark.vm
def test_only_no_publish_builds_are_not_recorded(repo: Path, no_leftover_qemu: None) -> None:
    done = build_py(repo, "smoke", "--no-publish")
    assert done.returncode == 0, done.stderr
    before = (repo / MANIFEST).read_text()
    for args in (("release", "record", "1.0.0", "smoke"), ("release", "record", "1.0.0"),
                 ("release", "set", "1.0.0", "smoke")):
        done = build_py(repo, *args)
        assert done.returncode == 1, args
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, done.stderr
        assert "--no-publish" in errors[0]
        assert "Traceback" not in done.stderr
    assert (repo / MANIFEST).read_text() == before
    # kept by tidy (nothing better), and said to be unpublished
    done = build_py(repo, "tidy", "--check")
    assert done.returncode == 0, done.stderr
    assert "not published" in done.stdout


# --- release record without names ---------------------------------------------------------------


@pytest.fixture
def image_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_image_repo(tmp_path / "repo", images=("base", "smoke", "tools"))
    monkeypatch.setenv("OSIMAGE_ROOT", str(root))
    return root


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir()
    return folder


def add(root: Path, mirror: Path, image: str, version: str,
        files: dict[str, tuple[bytes, str | None]], *, published: bool = True,
        dirty: bool = False) -> dict[str, Any]:
    """A build of image as manifest_entry() records it; published ones are put on mirror."""
    if published:
        folder = mirror / "builds" / image / version
        folder.mkdir(parents=True, exist_ok=True)
        for name, (body, _) in files.items():
            (folder / name).write_bytes(body)
    entry = {
        "name": image, "builder_type": "qemu", "build_time": 1_700_000_000, "artifact_id": "VM",
        "files": [{"name": n, "size": len(b), **({"kind": k} if k else {})}
                  for n, (b, k) in files.items()],
        "packer_run_uuid": str(uuid.uuid4()),
        "custom_data": {
            "version": version, "release": None, "git_commit": head(root), "dirty": dirty,
            "sha256": {n: hashlib.sha256(b).hexdigest() for n, (b, _) in files.items()},
            "published": published,
            "mirror_path": f"builds/{image}/{version}" if published else None,
        },
    }
    manifest.append_build(root / "images" / image / "manifest.json", entry)
    return entry


def disk(image: str, version: str) -> dict[str, tuple[bytes, str | None]]:
    return {f"{image}.qcow2": (f"{image} {version} ".encode() * 10, None)}


def test_record_without_names_skips_images_without_a_clean_published_build(
        image_repo: Path, mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add(image_repo, mirror, "smoke", "1.0", disk("smoke", "1.0"))
    add(image_repo, mirror, "tools", "3.0", disk("tools", "3.0"), published=False)
    add(image_repo, mirror, "tools", "3.1", disk("tools", "3.1"), dirty=True)
    code, out, err = run(capsys, "release", "record", "2.0.0", "--mirror-url", str(mirror))
    assert code == 0, err
    assert "recorded release 2.0.0 in manifests/manifest.yaml" in out
    assert ("skipped, no clean published build: base (no builds), tools (build 3.0 was made "
            "with --no-publish)") in err
    assert "error" not in err
    assert list(release.load(image_repo).get("2.0.0").images) == ["smoke"]


def test_record_without_names_fails_only_when_no_image_has_one(
        image_repo: Path, mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add(image_repo, mirror, "tools", "3.0", disk("tools", "3.0"), published=False)
    before = (image_repo / MANIFEST).read_text()
    code, _, err = run(capsys, "release", "record", "2.0.0", "--mirror-url", str(mirror))
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: release 2.0.0: no image has a clean published build to record "
                      "(base (no builds), smoke (no builds), tools (build 3.0 was made with "
                      "--no-publish))"]
    assert (image_repo / MANIFEST).read_text() == before


def test_a_named_image_with_only_a_no_publish_build_is_refused(
        image_repo: Path, mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add(image_repo, mirror, "smoke", "1.0", disk("smoke", "1.0"), published=False)
    before = (image_repo / MANIFEST).read_text()
    code, _, err = run(capsys, "release", "record", "2.0.0", "smoke", "--mirror-url", str(mirror))
    assert code == 1
    assert err.startswith("error: images/smoke/manifest.json: no published build of smoke to "
                          "record (build 1.0 was made with --no-publish; none of its clean "
                          "builds is on the mirror)\n")
    assert (image_repo / MANIFEST).read_text() == before


def test_tidy_and_record_prefer_the_published_build_of_the_same_version(
        image_repo: Path, mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kept = add(image_repo, mirror, "smoke", "1.0", disk("smoke", "1.0"))
    add(image_repo, mirror, "smoke", "1.0", disk("smoke", "1.0 again"), published=False)
    code, _, err = run(capsys, "release", "set", "2.0.0", "smoke", "--version", "1.0",
                       "--mirror-url", str(mirror))
    assert code == 0, err
    code, _, err = run(capsys, "tidy", "--check")
    assert code == 1
    assert f"2 builds, keep 1: 1.0 (run {kept['packer_run_uuid']})" in err
    assert run(capsys, "tidy")[0] == 0
    assert builds(image_repo, "smoke") == [kept]


# --- comments stay where they were ---------------------------------------------------------------

COMMENTED = """\
# Releases (hand-written header).
releases:
  1.0.0:
    images:
      smoke:
        version: '1.0'
        git_commit: {commit}
        files:
          - path: builds/smoke/1.0/smoke.qcow2
            size: {size}
            sha256: {sha}   # the disk

  # 1.1.0 is the one the cluster runs
  1.1.0:
    images:
      smoke:
        version: '1.0'
        git_commit: {commit}
        files:
          - path: builds/smoke/1.0/smoke.qcow2
            size: {size}
            sha256: {sha}
# end of the releases: 1.2.0 is planned for June
"""


@pytest.fixture
def commented(image_repo: Path, mirror: Path) -> dict[str, Any]:
    """COMMENTED over smoke 2.0 (disk + rootfs), smoke 1.0 (the latest) and base 1.0."""
    two = add(image_repo, mirror, "smoke", "2.0",
              {"smoke.qcow2": (b"two" * 10, None), "smoke-rootfs.tar": (b"tar" * 5, "rootfs")})
    one = add(image_repo, mirror, "smoke", "1.0", disk("smoke", "1.0"))
    base = add(image_repo, mirror, "base", "1.0", disk("base", "1.0"))
    text = COMMENTED.format(commit=head(image_repo), size=one["files"][0]["size"],
                            sha=one["custom_data"]["sha256"]["smoke.qcow2"])
    (image_repo / MANIFEST).write_text(text)
    return {"text": text, "one": one, "two": two, "base": base}


def file_lines(build: dict[str, Any], eol: str = "") -> str:
    out = []
    for i, f in enumerate(build["files"]):
        data = build["custom_data"]
        out.append(f"          - path: {data['mirror_path']}/{f['name']}\n"
                   f"            size: {f['size']}\n"
                   f"            sha256: {data['sha256'][f['name']]}{eol if i == 0 else ''}\n"
                   + (f"            kind: {f['kind']}\n" if "kind" in f else ""))
    return "".join(out)


def image_block(build: dict[str, Any], eol: str = "") -> str:
    data = build["custom_data"]
    return (f"      {build['name']}:\n        version: '{data['version']}'\n"
            f"        git_commit: {data['git_commit']}\n        files:\n"
            + file_lines(build, eol))


def releases_text(first: str, second: str) -> str:
    return ("# Releases (hand-written header).\nreleases:\n  1.0.0:\n    images:\n" + first
            + "\n  # 1.1.0 is the one the cluster runs\n  1.1.0:\n    images:\n" + second
            + "# end of the releases: 1.2.0 is planned for June\n")


def test_the_fixture_is_what_the_expectations_build(commented: dict[str, Any]) -> None:
    one = commented["one"]
    assert commented["text"] == releases_text(image_block(one, "   # the disk"),
                                              image_block(one))


@pytest.mark.parametrize("release", ["1.0.0", "1.1.0"])
def test_a_files_list_that_grows_and_shrinks_keeps_the_comments(
        image_repo: Path, mirror: Path, commented: dict[str, Any],
        capsys: pytest.CaptureFixture[str], release: str) -> None:
    one, two = commented["one"], commented["two"]
    code, _, err = run(capsys, "release", "set", release, "smoke", "--version", "2.0", "--force",
                       "--mirror-url", str(mirror))
    assert code == 0, err
    if release == "1.0.0":  # the comment above 1.1.0 stays above it
        expected = releases_text(image_block(two, "   # the disk"), image_block(one))
    else:  # the comment at the end of the file stays at the end
        expected = releases_text(image_block(one, "   # the disk"), image_block(two))
    assert (image_repo / MANIFEST).read_text() == expected
    # and back: the list shrinks to one file, and the file is as it was, byte for byte
    code, _, err = run(capsys, "release", "set", release, "smoke", "--version", "1.0", "--force",
                       "--mirror-url", str(mirror))
    assert code == 0, err
    assert (image_repo / MANIFEST).read_text() == commented["text"]


@pytest.mark.parametrize("release", ["1.0.0", "1.1.0"])
def test_an_images_map_that_grows_and_shrinks_keeps_the_comments(
        image_repo: Path, mirror: Path, commented: dict[str, Any],
        capsys: pytest.CaptureFixture[str], release: str) -> None:
    one, base = commented["one"], commented["base"]
    code, _, err = run(capsys, "release", "set", release, "base", "--mirror-url", str(mirror))
    assert code == 0, err
    first = image_block(one, "   # the disk")
    if release == "1.0.0":
        expected = releases_text(first + image_block(base), image_block(one))
    else:
        expected = releases_text(first, image_block(one) + image_block(base))
    assert (image_repo / MANIFEST).read_text() == expected
    code, _, err = run(capsys, "release", "record", release, "smoke", "--force",
                       "--mirror-url", str(mirror))
    assert code == 0, err
    assert (image_repo / MANIFEST).read_text() == commented["text"]


def test_a_new_release_goes_above_the_comment_at_the_end(
        image_repo: Path, mirror: Path, commented: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "release", "set", "1.2.0", "base", "--mirror-url", str(mirror))
    assert code == 0, err
    end = "# end of the releases: 1.2.0 is planned for June\n"
    assert (image_repo / MANIFEST).read_text() == (
        commented["text"].removesuffix(end) + "  1.2.0:\n    images:\n"
        + image_block(commented["base"]) + end)


FIRST_DROPPED = """\
releases:
  1.0.0:
    images:
      # base: the compute node image
      base:
        version: '1.0'
        git_commit: {commit}
        files:
          - {{path: builds/base/1.0/base.qcow2, size: {bsize}, sha256: {bsha}}}
      # smoke: the pipeline's test image
      smoke:
        version: '1.0'
        git_commit: {commit}
        files:
          - {{path: builds/smoke/1.0/smoke.qcow2, size: {size}, sha256: {sha}}}

  # next
  1.1.0:
    images: {{}}
"""


def test_dropping_the_first_image_keeps_the_comment_above_the_next(
        image_repo: Path, mirror: Path, commented: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    one, base = commented["one"], commented["base"]
    text = FIRST_DROPPED.format(
        commit=head(image_repo), size=one["files"][0]["size"],
        sha=one["custom_data"]["sha256"]["smoke.qcow2"], bsize=base["files"][0]["size"],
        bsha=base["custom_data"]["sha256"]["base.qcow2"])
    (image_repo / MANIFEST).write_text(text)
    code, _, err = run(capsys, "release", "record", "1.0.0", "smoke", "--force",
                       "--mirror-url", str(mirror))
    assert code == 0, err
    start = text.index("      base:\n")
    assert (image_repo / MANIFEST).read_text() == \
        text[:start] + text[text.index("      # smoke:"):]


# --- the HTTP mirror down during release verify -------------------------------------------------


def test_verify_against_a_stopped_http_mirror_is_one_line(tmp_path: Path) -> None:
    root = make_image_repo(tmp_path / "repo")
    folder = tmp_path / "mirror"
    add(root, folder, "smoke", "1.0", disk("smoke", "1.0"))
    env = {**os.environ, "OSIMAGE_ROOT": str(root), "NO_COLOR": "1", "COLUMNS": "200"}

    def build(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(PROJECT / "build.py"), *args], cwd=root,
                              env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    with HTTPServer(folder) as http:
        url = http.url
        done = build("release", "record", "2.0.0", "smoke", "--mirror-url", url)
        assert done.returncode == 0, done.stderr
    # the same port, nobody listening now
    done = build("release", "verify", "2.0.0", "--mirror-url", url)
    assert done.returncode == 1
    assert done.stderr == (f"error: mirror {url}: cannot connect to get "
                           "builds/smoke/1.0/smoke.qcow2: connection refused\n")
    assert "Traceback" not in done.stdout + done.stderr
    assert "HTTPConnectionPool" not in done.stdout + done.stderr

    # a name that does not resolve, and a server that is not a mirror: also a few words
    done = build("release", "verify", "2.0.0", "--mirror-url", "http://mirror.invalid/osimage")
    assert done.returncode == 1
    assert done.stderr.endswith(": name not resolved\n"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    with HTTPServer(other) as http:
        done = build("release", "verify", "2.0.0", "--mirror-url", http.url)
    assert done.returncode == 1
    assert "builds/smoke/1.0/smoke.qcow2 (missing on the mirror)" in done.stderr
