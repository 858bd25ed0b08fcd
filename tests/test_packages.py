"""Package lists and SBOMs end to end: two real smoke builds (qemu, TCG) whose source disks are
made by scripts/make-smoke-disk.sh from the host's Debian packages and a tiny .deb built with
dpkg-deb at 1.9-1, then at 1.10-1; both builds are recorded in releases A and B, and
`./build.py release diff/show` read their lists back from the mirror. The builds are shared
by every test of the module (a module-scoped fixture)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_py, git, make_repo
from tests.test_release_diff import assert_valid_cyclonedx

pytestmark = pytest.mark.vm

TINY = "osimage-tiny"


def make_deb(folder: Path, version: str) -> Path:
    """A real .deb, built with dpkg-deb, with a machine-readable copyright file."""
    tree = folder / f"tiny-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {TINY}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: osimage tests <test@osimage.invalid>\nDescription: tiny test package\n")
    doc = tree / "usr" / "share" / "doc" / TINY
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: none\nLicense: MIT\n")
    deb = folder / f"{TINY}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), str(deb)],
                   check=True, capture_output=True)
    return deb


def make_source(repo: Path, deb: Path) -> None:
    """The smoke source disk with deb in it, where the build takes it (its stamp says the
    project's script made it)."""
    sources = repo / "build" / "sources" / "smoke"
    proc = subprocess.run([str(repo / "scripts" / "make-smoke-disk.sh"), str(sources)],
                          capture_output=True, text=True, env={
                              "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                              "SMOKE_EXTRA_DEBS": str(deb)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = repo / "scripts" / "make-smoke-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest()
                                            + "\n")


@dataclass
class Builds:
    repo: Path
    version_a: str
    version_b: str
    commit_a: str

    def published(self, version: str) -> Path:
        return self.repo / "mirror" / "builds" / "smoke" / version

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return build_py(self.repo, *args)


def build_and_record(repo: Path, release: str) -> str:
    commit = git(repo, "rev-parse", "HEAD").strip()
    proc = build_py(repo, "smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "==> list packages" in proc.stderr
    rec = build_py(repo, "release", "record", release, "smoke")
    assert rec.returncode == 0, rec.stderr
    return f"g{commit[:10]}"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    tmp = tmp_path_factory.mktemp("packages")
    repo = make_repo(tmp / "repo")
    make_source(repo, make_deb(tmp, "1.9-1"))
    commit_a = git(repo, "rev-parse", "HEAD").strip()
    version_a = build_and_record(repo, "A")
    make_source(repo, make_deb(tmp, "1.10-1"))
    git(repo, "add", "-A")  # release A's record
    git(repo, "commit", "-q", "-m", "release A")
    version_b = build_and_record(repo, "B")
    yield Builds(repo, version_a, version_b, commit_a)


def package_doc(b: Builds, version: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((b.published(version) / "smoke.packages.json").read_text())
    return doc


def test_smoke_list_is_what_its_disk_was_made_from(builds: Builds) -> None:
    doc = package_doc(builds, builds.version_a)
    assert doc["manager"] == "dpkg" and doc["image"] == "smoke" and doc["complete"] is True
    listed = {p["name"]: p for p in doc["packages"]}
    # the packages owning the files the script copies, at the host's versions
    for path in ("/bin/busybox", "/usr/sbin/dropbear", "/usr/bin/scp",
                 "/usr/lib/syslinux/mbr/mbr.bin"):
        owner = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True,
                               check=True).stdout.split(":")[0]
        assert owner in listed, (path, owner)
    host = dict(line.split("\t") for line in subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *[n for n in listed
                                                                  if n != TINY]],
        capture_output=True, text=True, check=True).stdout.splitlines())
    for name, p in listed.items():
        full = (f"{p['epoch'] + ':' if p['epoch'] else ''}{p['version']}"
                f"{'-' + p['release'] if p['release'] else ''}")
        assert full == ("1.9-1" if name == TINY else host[name]), name
    assert any(n.startswith("linux-image-") for n in listed) and "libc6" in listed
    assert listed[TINY]["licenses"] == ["MIT"]
    assert listed["busybox-static"]["source"] == "busybox"
    assert listed[TINY]["purl"] == "pkg:deb/debian/osimage-tiny@1.9-1?arch=all&distro=debian-12"

    # published with their .sha256, recorded with their kind, in the release too
    build = json.loads((builds.repo / "images" / "smoke" / "manifest.json").read_text())
    first = build["builds"][0]
    kinds = {f["name"]: f.get("kind") for f in first["files"]}
    assert kinds["smoke.packages.json"] == "packages" and kinds["smoke.cdx.json"] == "sbom"
    assert first["custom_data"]["packages"]["count"] == len(listed)
    for name in ("smoke.packages.json", "smoke.cdx.json"):
        data = (builds.published(builds.version_a) / name).read_bytes()
        assert first["custom_data"]["sha256"][name] == hashlib.sha256(data).hexdigest()
        check = subprocess.run(["sha256sum", "-c", f"{name}.sha256"],
                               cwd=builds.published(builds.version_a), capture_output=True)
        assert check.returncode == 0
    show = builds.run("release", "show", "A", "--json")
    files = json.loads(show.stdout)["images"]["smoke"]["files"]
    assert {f["kind"] for f in files} == {None, "packages", "sbom"}


def test_sbom_is_valid_cyclonedx(builds: Builds) -> None:
    text = (builds.published(builds.version_b) / "smoke.cdx.json").read_text()
    assert_valid_cyclonedx(text)
    sbom = json.loads(text)
    assert sbom["metadata"]["component"]["name"] == "smoke"
    purls = {c["purl"] for c in sbom["components"]}
    assert "pkg:deb/debian/osimage-tiny@1.10-1?arch=all&distro=debian-12" in purls
    assert len(purls) == len(package_doc(builds, builds.version_b)["packages"])


def test_release_diff_shows_the_upgrade(builds: Builds) -> None:
    proc = builds.run("release", "diff", "A", "B")
    assert proc.returncode == 0, proc.stderr
    # 1.10-1 sorts before 1.9-1 as strings: dpkg's order says upgraded
    assert "  smoke packages: 0 added, 0 removed, 1 upgraded, 0 downgraded" in proc.stdout
    assert f"    upgraded {TINY} 1.9-1 -> 1.10-1 (all)" in proc.stdout
    back = builds.run("release", "diff", "B", "A", "--json")
    assert back.returncode == 0, back.stderr
    changes = json.loads(back.stdout)["images"]["smoke"]
    assert changes["downgraded"] == [{"name": TINY, "arch": "all", "from": "1.10-1",
                                      "to": "1.9-1"}]
    assert changes["upgraded"] == changes["added"] == changes["removed"] == []


def test_release_show_packages(builds: Builds) -> None:
    proc = builds.run("release", "show", "B", "smoke", "--packages")
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:3] == [TINY, "1.10-1", "all"] for line in proc.stdout.splitlines())
    n = len(package_doc(builds, builds.version_b)["packages"])
    assert f"{n} packages (dpkg) in smoke {builds.version_b}, release B" in proc.stdout


def test_releases_recorded_before_package_lists(builds: Builds) -> None:
    """A release whose record names no package list (made before this feature): the diff
    says so and still shows the rest."""
    proc = builds.run("release", "set", "old", "smoke", "--version", builds.version_a,
                      "--commit", builds.commit_a, "--file", "smoke.qcow2")
    assert proc.returncode == 0, proc.stderr
    diff = builds.run("release", "diff", "old", "B")
    assert diff.returncode == 0, diff.stderr
    assert "  smoke packages: no package list recorded for smoke in release old" in diff.stdout
    assert "~ smoke:" in diff.stdout
    show = builds.run("release", "show", "old", "smoke", "--packages")
    assert show.returncode == 0 and "no package list recorded for smoke in release old" \
        in show.stdout


def publish_patches(repo: Path, day: str, advisories: list[str]) -> str:
    """A patch tarball on the mirror as --create-patches publishes it: .sha256 and index."""
    folder = repo / "mirror" / "repos" / "smoke"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{a} security/Important busybox-1.35.0-4.x86_64\n" for a in advisories)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("advisories.txt")
        info.size = len(text)
        t.addfile(info, io.BytesIO(text.encode()))
    blob = buf.getvalue()
    name = f"smoke-patches-{day}.tar.gz"
    sha = hashlib.sha256(blob).hexdigest()
    (folder / name).write_bytes(blob)
    (folder / f"{name}.sha256").write_text(f"{sha}  {name}\n")
    (folder / f"smoke-patches-{day}.index.json").write_text(json.dumps(
        {"name": name, "sha256": sha, "size": len(blob),
         "advisories": [{"id": a, "type": "security/Important", "packages": []}
                        for a in advisories], "packages": []}))
    return f"repos/smoke/{name}"


def test_release_diff_names_the_new_advisories(builds: Builds) -> None:
    for release, day, ids in (("A", "20261101", ["SMOKE-2026:1"]),
                              ("B", "20261126", ["SMOKE-2026:1", "SMOKE-2026:2"])):
        path = publish_patches(builds.repo, day, ids)
        proc = builds.run("release", "set-patches", release, path)
        assert proc.returncode == 0, proc.stderr
    proc = builds.run("release", "diff", "A", "B")
    assert proc.returncode == 0, proc.stderr
    assert "  advisories B applies that A did not: SMOKE-2026:2 (security/Important)" \
        in proc.stdout
    as_json = json.loads(builds.run("release", "diff", "A", "B", "--json").stdout)
    assert as_json["advisories"] == [{"id": "SMOKE-2026:2", "type": "security/Important"}]


def test_a_changed_list_on_the_mirror_is_refused(builds: Builds) -> None:
    """The diff reads what the release recorded, or says it cannot: one line, exit 1."""
    listed = builds.published(builds.version_b) / "smoke.packages.json"
    kept = listed.read_bytes()
    listed.write_bytes(kept.replace(b'"1.10"', b'"1.11"'))
    try:
        proc = builds.run("release", "diff", "A", "B")
    finally:
        listed.write_bytes(kept)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: builds/smoke/{builds.version_b}/smoke.packages.json: its sha256 "
                      "on the local mirror "
                      f"{builds.repo / 'mirror'} is not the one release B records"], proc.stderr
    assert "Traceback" not in proc.stderr
