"""Many images at once (issue 16.3): `./build.py plan` prints the build order (parents first, an
image that embeds another after it) and, for each image, "up to date (build V)" or what changed
(which input, old and new hash), building nothing; `./build.py all` builds them in that order,
reuses up-to-date ones, skips the dependents of a failed image while the others go on, and
stops at Ctrl-C. One module-scoped repository shares the builds: smoke, smoke2 (another
smoke-like image), smoke-child (`parent: smoke`), broken (a provisioner that exits 1) and
broken-child (`parent: broken`); embeds-smoke embeds smoke's disk of a release."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_py, git, make_repo, qemu_pids, under_load
from tests.test_parent import CHILD_YAML, add_child
from tests.test_uptodate import watched

pytestmark = pytest.mark.vm

FAILING = "#!/bin/sh\necho 'this provisioner fails on purpose' >&2\nexit 1\n"
BUILT = ("smoke", "smoke2", "broken", "broken-child", "smoke-child")


def add_smoke_like(root: Path, name: str, marker: str | None = None,
                   extra_yaml: str = "") -> None:
    """A copy of images/smoke under another name (its provisioner replaced by `marker`)."""
    folder = root / "images" / name
    shutil.copytree(root / "images" / "smoke", folder)
    (folder / "manifest.json").unlink(missing_ok=True)
    yaml = folder / "image.yaml"
    yaml.write_text(re.sub(r"(?m)^description: .*$", f"description: {name}, a copy of smoke",
                           yaml.read_text()) + extra_yaml)
    if marker is not None:
        (folder / "provision" / "marker.sh").write_text(marker)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, smoke_sources: Path) -> Path:
    import hashlib

    root = make_repo(tmp_path_factory.mktemp("all-plan") / "repo")
    sources = root / "build" / "sources" / "smoke"
    shutil.copytree(smoke_sources, sources)
    script = root / "scripts" / "make-smoke-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    add_smoke_like(root, "smoke2")
    add_smoke_like(root, "broken", marker=FAILING)
    add_smoke_like(root, "embeds-smoke", extra_yaml="payload:\n  image: smoke\n"
                                                    "  destination: /data/payload\n")
    add_child(root, "smoke-child")
    add_child(root, "broken-child", CHILD_YAML.replace("parent: smoke", "parent: broken"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the images of tests/test_all_plan.py")
    return root


def plan_rows(out: str) -> dict[str, tuple[str, str]]:
    """`plan`'s table: image -> (order, plan)."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\d+|-)\s+(\S+)(?: \(parent of \S+\))?\s{2,}(.*)$", line)
        if m:
            rows[m.group(2)] = (m.group(1), m.group(3))
    return rows


def summary(out: str) -> dict[str, str]:
    """`all`'s table: image -> result."""
    rows = {}
    for line in out.splitlines()[1:]:
        m = re.match(r"^(\S+)\s{2,}(.*?)\s{2,}(-|[\d.]+ s)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def builds(repo: Path, image: str) -> list[dict[str, Any]]:
    path = repo / "images" / image / "manifest.json"
    if not path.exists():
        return []
    data: list[dict[str, Any]] = json.loads(path.read_text())["builds"]
    return data


def started(stderr: str) -> list[str]:
    """The images whose build `all` started, in order."""
    return re.findall(r"(?m)^=== (\S+) \(\d+ of \d+\)$", stderr)


def test_plan_before_any_build_and_bad_names(repo: Path) -> None:
    t0 = time.monotonic()
    proc = build_py(repo, "plan")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    rows = plan_rows(proc.stdout)
    order = sorted((name for name, (n, _) in rows.items() if n != "-"),
                   key=lambda name: int(rows[name][0]))
    assert order.index("smoke") < order.index("smoke-child")
    assert order.index("broken") < order.index("broken-child")
    assert rows["smoke"][1] == rows["smoke2"][1] == rows["broken"][1] == "builds: never built"
    assert rows["smoke-child"][1] == ("builds after its parent smoke, whose new disk is an "
                                      "input")
    # an image that embeds a release's disk cannot build without --release: said, not failed
    for name in ("embeds-smoke", "usb-installer"):
        assert rows[name][0] == "-" and rows[name][1].startswith("not built: "), rows[name]
        assert "--release" in rows[name][1]
    assert took < under_load(30), took  # no VM, no artifact hashed (about 0.6 s of CPU here)
    print(f"plan of {len(rows)} images before any build: {took:.2f} s")

    # a child named alone brings its parent, first
    proc = build_py(repo, "plan", "smoke-child")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"(?m)^1\s+smoke \(parent of smoke-child\)\s+builds: never built$",
                     proc.stdout), proc.stdout
    assert re.search(r"(?m)^2\s+smoke-child\s+builds after its parent smoke", proc.stdout)

    # bad names: one line, exit 2, nothing built or written
    before = sorted(p.name for p in (repo / "images").iterdir())
    for args in (("plan", "nosuch"), ("all", "smoke", "smoek"), ("all", "embeds-smoke")):
        proc = build_py(repo, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("  ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
    assert "error: unknown image 'smoek'" in build_py(repo, "all", "smoke", "smoek").stderr
    assert not (repo / "mirror").exists() and not (repo / "images/smoke/manifest.json").exists()
    assert sorted(p.name for p in (repo / "images").iterdir()) == before


@pytest.fixture(scope="module")
def first_all(repo: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """The one `all` that builds: smoke, smoke2, smoke-child, broken (fails), broken-child."""
    t0 = time.monotonic()
    proc = build_py(repo, "all", *BUILT, timeout=1500)
    took = time.monotonic() - t0
    print(f"all {' '.join(BUILT)}: {took:.1f} s")
    return proc, took


def test_all_goes_on_after_a_failure_and_skips_its_dependents(
        repo: Path, first_all: tuple[subprocess.CompletedProcess[str], float]) -> None:
    proc, _ = first_all
    assert proc.returncode == 1, proc.stderr[-3000:]
    # parents first; the failed image's child never starts, the independent images go on
    assert started(proc.stderr) == ["broken", "smoke", "smoke-child", "smoke2"]
    results = summary(proc.stdout)
    assert results["broken"].startswith("failed: packer build failed"), results
    assert results["broken-child"] == "skipped: parent broken failed"
    for name in ("smoke", "smoke2", "smoke-child"):
        assert re.fullmatch(r"built: g[0-9a-f]+", results[name]), results
        assert len(builds(repo, name)) == 1
    assert builds(repo, "broken") == [] and builds(repo, "broken-child") == []
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "error: 1 of 5 images failed: broken; skipped: broken-child")
    assert "Traceback" not in proc.stderr
    assert not qemu_pids(repo)
    # each build ran as ./build.py IMAGE runs it: the same steps and the same last line
    assert proc.stderr.count("==> check up to date") == 4
    assert re.search(r"(?m)^built smoke-child g[0-9a-f]+ in [\d.]+ s: builds/smoke-child/",
                     proc.stderr)
    # the record has each named input's hash beside the total
    recorded = builds(repo, "smoke-child")[0]["custom_data"]["inputs"]
    assert {"image folder", "templates", "source", "backend", "osimage",
            "parent"} <= set(recorded)


def test_all_again_reuses_up_to_date_images(
        repo: Path, first_all: tuple[subprocess.CompletedProcess[str], float]) -> None:
    _, full = first_all
    proc, took, vms = watched(repo, "all", "smoke-child", "smoke2")
    assert proc.returncode == 0, proc.stderr
    assert not vms
    results = summary(proc.stdout)
    assert list(results) == ["smoke", "smoke-child", "smoke2"]  # smoke: the parent, added
    for name in results:
        version = builds(repo, name)[0]["custom_data"]["version"]
        assert results[name] == f"up to date: build {version}"
        assert len(builds(repo, name)) == 1
    assert "packer build" not in proc.stderr
    print(f"all of 3 up-to-date images: {took:.2f} s (the first all: {full:.1f} s)")

    t0 = time.monotonic()
    proc = build_py(repo, "plan", "smoke", "smoke2", "smoke-child")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    for name, (_, text) in plan_rows(proc.stdout).items():
        assert text == f"up to date (build {builds(repo, name)[0]['custom_data']['version']})"
    print(f"plan of 3 up-to-date images: {took:.2f} s")

    # --release: the image that embeds smoke's disk of the release comes after smoke, though
    # its name sorts first
    done = build_py(repo, "release", "record", "1.0", "smoke")
    assert done.returncode == 0, done.stderr
    git(repo, "commit", "-qam", "release 1.0")
    proc = build_py(repo, "plan", "embeds-smoke", "smoke", "--release", "1.0")
    assert proc.returncode == 0, proc.stderr
    rows = plan_rows(proc.stdout)
    assert rows["smoke"][0] == "1" and rows["embeds-smoke"] == ("2", "builds: never built")


def test_plan_says_which_input_changed(
        repo: Path, first_all: tuple[subprocess.CompletedProcess[str], float]) -> None:
    old = {n: builds(repo, n)[0]["custom_data"] for n in ("smoke", "smoke2", "smoke-child")}
    marker = repo / "images" / "smoke2" / "provision" / "marker.sh"
    marker.write_text(marker.read_text() + "# a change to smoke2 alone\n")
    git(repo, "commit", "-qam", "change smoke2")
    proc = build_py(repo, "plan", "smoke", "smoke2", "smoke-child")
    assert proc.returncode == 0, proc.stderr
    rows = plan_rows(proc.stdout)
    assert rows["smoke"][1] == f"up to date (build {old['smoke']['version']})"
    assert rows["smoke-child"][1] == f"up to date (build {old['smoke-child']['version']})"
    before = old["smoke2"]["inputs"]["image folder"][:12]
    assert re.fullmatch(rf"builds: changed since build {old['smoke2']['version']}: "
                        rf"image folder {before} -> [0-9a-f]{{12}} "
                        r"\(images/smoke2/provision/marker\.sh\)", rows["smoke2"][1]), rows

    # a change to the parent: it and its child build, the child because of its parent
    marker = repo / "images" / "smoke" / "provision" / "marker.sh"
    marker.write_text(marker.read_text() + "# a change to smoke\n")
    git(repo, "commit", "-qam", "change smoke")
    again = plan_rows(build_py(repo, "plan", "smoke", "smoke2", "smoke-child").stdout)
    before = old["smoke"]["inputs"]["image folder"][:12]
    assert re.fullmatch(rf"builds: changed since build {old['smoke']['version']}: "
                        rf"image folder {before} -> [0-9a-f]{{12}} "
                        r"\(images/smoke/provision/marker\.sh\)", again["smoke"][1]), again
    assert again["smoke-child"][1] == ("builds after its parent smoke, whose new disk is an "
                                       "input")
    assert again["smoke2"] == rows["smoke2"]


def test_ctrl_c_stops_the_run_and_starts_no_further_image(
        repo: Path, first_all: tuple[subprocess.CompletedProcess[str], float]) -> None:
    count = len(builds(repo, "smoke2"))
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("OSIMAGE_ROOT", None)
    proc = subprocess.Popen([sys.executable, str(repo / "build.py"), "all", "broken", "smoke2"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # its own process group, as a shell's job
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("==> packer build"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-3000:]
    assert started(err) == ["broken"]
    results = summary(out)
    assert results == {"broken": "interrupted", "smoke2": "not started: interrupted"}, out
    assert err.rstrip().splitlines()[-1].startswith("error: interrupted by SIGINT")
    assert "Traceback" not in err
    assert len(builds(repo, "smoke2")) == count
    assert not qemu_pids(repo)


def test_a_cycle_through_an_embedded_image_is_one_line(tmp_path: Path) -> None:
    """loop-a embeds loop-b, whose parent is loop-a: no order exists (exit 2, nothing run)."""
    root = make_repo(tmp_path / "repo")
    add_smoke_like(root, "loop-a", extra_yaml="payload:\n  image: loop-b\n"
                                              "  destination: /data/payload\n")
    add_child(root, "loop-b", CHILD_YAML.replace("parent: smoke", "parent: loop-a"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a cycle")
    for args in (("plan",), ("plan", "loop-b"), ("all", "loop-b", "--release", "1.0")):
        proc = build_py(root, *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            "error: images/loop-a/image.yaml: parent, payload.image: a cycle of images each "
            "built before the next: loop-a -> loop-b -> loop-a"], proc.stderr
        assert proc.stdout == ""
