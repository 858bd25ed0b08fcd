"""End to end: real packer + qemu builds of the smoke image, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import build_py, git, qemu_pids, under_load

pytestmark = pytest.mark.vm

P2_OFFSET = 67108864  # the smoke disk's data partition (scripts/make-smoke-disk.sh)


def read_marker(artifact: Path, tmp: Path) -> str:
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)], check=True)
    out = subprocess.run(["debugfs", "-R", "cat /marker", f"{raw}?offset={P2_OFFSET}"],
                         check=True, capture_output=True, text=True)
    raw.unlink()
    return out.stdout


def test_build_end_to_end(repo: Path, tmp_path: Path, no_leftover_qemu: None) -> None:
    commit = git(repo, "rev-parse", "HEAD").strip()
    version = f"g{commit[:10]}"
    t0 = time.monotonic()
    proc = build_py(repo, "smoke")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < under_load(60), f"the smoke build took {elapsed:.1f} s"
    # the terminal showed each step with its time, and Packer's steps
    for step in ("prepare source", "render and validate HCL", "packer build", "hash artifacts",
                 "publish to mirror", "record in manifest.json"):
        assert f"ok {step} (" in proc.stderr
    assert "Connected to SSH!" in proc.stderr

    # the artifact is in the mirror, with a sha256sum-format checksum beside it
    published = repo / "mirror" / "builds" / "smoke" / version
    artifact = published / "smoke.qcow2"
    assert artifact.is_file()
    assert (repo / "mirror" / "repos" / "Rocky8").is_dir()
    check = subprocess.run(["sha256sum", "-c", "smoke.qcow2.sha256"], cwd=published,
                           capture_output=True, text=True)
    assert check.returncode == 0 and "smoke.qcow2: OK" in check.stdout
    assert not [p for p in published.iterdir() if p.name.startswith(".")]

    # the provisioner really reached the disk
    marker = read_marker(artifact, tmp_path)
    assert "osimage smoke marker" in marker
    assert f"version={version}" in marker and f"commit={commit}" in marker

    # manifest.json, in Packer's format, records the build
    data = json.loads((repo / "images" / "smoke" / "manifest.json").read_text())
    assert len(data["builds"]) == 1
    entry = data["builds"][0]
    assert data["last_run_uuid"] == entry["packer_run_uuid"]
    assert entry["name"] == "smoke" and entry["builder_type"] == "qemu"
    # the disk, then its package list and SBOM (issue 17)
    assert entry["files"][0] == {"name": "smoke.qcow2", "size": artifact.stat().st_size}
    assert [(f["name"], f.get("kind")) for f in entry["files"][1:]] == [
        ("smoke.packages.json", "packages"), ("smoke.cdx.json", "sbom")]
    custom = entry["custom_data"]
    assert custom["version"] == version and custom["git_commit"] == commit
    assert custom["dirty"] is False
    sha = (published / "smoke.qcow2.sha256").read_text().split()[0]
    assert custom["sha256"]["smoke.qcow2"] == sha
    assert set(custom["sha256"]) == {"smoke.qcow2", "smoke.packages.json", "smoke.cdx.json"}
    assert (repo / "build" / "smoke" / version / "packer.log").read_text().count("Connected to SSH")

    # the build key is gone, and no secret was written into what is kept
    hcl = (repo / "build" / "smoke" / version / "smoke.pkr.hcl").read_text()
    key = next(line for line in hcl.splitlines() if "ssh_private_key_file" in line)
    assert not Path(key.split('"')[1]).exists()
    for kept in (repo / "build" / "smoke" / version).rglob("*"):
        if kept.is_file():
            assert b"PRIVATE KEY" not in kept.read_bytes(), kept

    # a second build of the same commit (manifest.json is not an input: the tree stays clean);
    # its files are on the mirror already, so it needs --replace (tests/test_immutable.py),
    # and its inputs did not change, so --rebuild (tests/test_uptodate.py)
    again = build_py(repo, "smoke", "--rebuild", "--replace")
    assert again.returncode == 0, again.stderr
    data = json.loads((repo / "images" / "smoke" / "manifest.json").read_text())
    assert len(data["builds"]) == 2


def test_dirty_tree_refused_then_skip_commit(repo: Path) -> None:
    (repo / "images" / "smoke" / "provision" / "marker.sh").write_text(
        (repo / "images" / "smoke" / "provision" / "marker.sh").read_text() + "\n# local edit\n")
    (repo / "notes.txt").write_text("untracked\n")
    proc = build_py(repo, "smoke")
    assert proc.returncode == 2
    assert "dirty" in proc.stderr
    assert "images/smoke/provision/marker.sh" in proc.stderr and "notes.txt" in proc.stderr
    assert "--skip-commit" in proc.stderr
    assert not (repo / "mirror").exists() and not (repo / "images/smoke/manifest.json").exists()

    proc = build_py(repo, "smoke", "--skip-commit", "--release", "9.9.9")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((repo / "images/smoke/manifest.json").read_text())["builds"][0]
    assert entry["custom_data"]["version"] == "9.9.9-dirty"
    assert entry["custom_data"]["dirty"] is True
    assert entry["custom_data"]["release"] == "9.9.9"
    assert (repo / "mirror/builds/smoke/9.9.9-dirty/smoke.qcow2").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_build(repo: Path, sig: signal.Signals) -> None:
    before = qemu_pids(repo)
    proc = subprocess.Popen([sys.executable, str(repo / "build.py"), "smoke"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait until the VM is really running
        seen.append(line)
        if "Waiting for SSH" in line or "Connected to SSH" in line:
            break
    else:
        pytest.fail("build ended before the VM started:\n" + "".join(seen))
    assert qemu_pids(repo) - before, "no qemu running mid-build"
    t0 = time.monotonic()
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=40)
    stopped = time.monotonic() - t0
    assert proc.returncode == 130, "".join(seen) + rest
    assert stopped < under_load(30), f"took {stopped:.1f} s to stop"
    assert "interrupted" in rest
    assert not (qemu_pids(repo) - before), "qemu left running"
    assert not (repo / "images/smoke/manifest.json").exists()
    assert not (repo / "mirror/builds/smoke").exists() or not any(
        (repo / "mirror/builds/smoke").rglob("*.qcow2"))
    outputs = list((repo / "build/smoke").glob("*/output"))
    assert not outputs, f"half-written output left: {outputs}"


def test_concurrent_builds_keep_manifest_whole(repo: Path, no_leftover_qemu: None) -> None:
    procs = [subprocess.Popen([sys.executable, str(repo / "build.py"), "smoke", "--release", rel],
                              cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, stdin=subprocess.DEVNULL)
             for rel in ("1.0.0", "1.0.1")]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    data = json.loads((repo / "images/smoke/manifest.json").read_text())
    versions = sorted(b["custom_data"]["version"] for b in data["builds"])
    assert versions == ["1.0.0", "1.0.1"]
    assert data["last_run_uuid"] in {b["packer_run_uuid"] for b in data["builds"]}


def test_failing_provisioner_fails_cleanly(repo: Path, no_leftover_qemu: None) -> None:
    script = repo / "images/smoke/provision/marker.sh"
    script.write_text("#!/bin/sh\necho 'provisioning went wrong' >&2\nexit 3\n")
    git(repo, "commit", "-qam", "break the provisioner")
    proc = build_py(repo, "smoke")
    assert proc.returncode == 1
    assert "packer build failed" in proc.stderr
    assert "provisioning went wrong" in proc.stderr  # the log's last lines are shown
    assert not (repo / "images/smoke/manifest.json").exists()
    assert not list((repo / "build/smoke").glob("*/output"))
    assert not (repo / "mirror/builds/smoke").exists()
