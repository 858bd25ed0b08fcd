"""Bad input: one clear line naming the file and key, exit 2, nothing changed on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT, build_py, git, make_repo, tree_snapshot


@pytest.fixture
def cfg_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def edit_image(repo: Path, old: str, new: str) -> None:
    path = repo / "images/smoke/image.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    git(repo, "commit", "-qam", "edit image.yaml")


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error:"))


CASES = [
    # (old text, new text, expected pieces of the error line)
    ("memory: 256\n", "", ["images/smoke/image.yaml", "memory", "missing required key"]),
    ("memory: 256", "memroy: 256", ["images/smoke/image.yaml", "memroy", "did you mean 'memory'"]),
    ("cpus: 1", "cpus: one", ["images/smoke/image.yaml", "cpus", "must be an integer, not string"]),
    ("  checksum: file:build/sources/smoke/smoke.qcow2.sha256",
     "  checksum: md5:0123456789abcdef",
     ["images/smoke/image.yaml", "source.checksum", "sha256:"]),
    ("  checksum: file:build/sources/smoke/smoke.qcow2.sha256",
     "  checksum: sha256:ABC",
     ["images/smoke/image.yaml", "source.checksum", "64"]),
    ("    type: shell", "    type: shel",
     ["images/smoke/image.yaml", "provisioners[0].type", "did you mean 'shell'"]),
    ("  username: root", "  usrname: root",
     ["images/smoke/image.yaml", "ssh.usrname", "did you mean 'username'"]),
    ("disk_size: 128M", "disk_size: big",
     ["images/smoke/image.yaml", "disk_size", "'512M'"]),
    ("cpus: 1", "cpus: [1", ["images/smoke/image.yaml:", "not valid YAML"]),
]


@pytest.mark.parametrize(("old", "new", "expected"), CASES)
def test_bad_image_yaml(cfg_repo: Path, old: str, new: str, expected: list[str]) -> None:
    edit_image(cfg_repo, old, new)
    before = tree_snapshot(cfg_repo)
    proc = build_py(cfg_repo, "smoke")
    assert proc.returncode == 2, proc.stderr
    line = first_error(proc.stderr)
    for piece in expected:
        assert piece in line, line
    # the error is the only thing printed: no build step started
    assert "==>" not in proc.stderr
    assert tree_snapshot(cfg_repo) == before
    assert not (cfg_repo / "build").exists() and not (cfg_repo / "mirror").exists()


def test_all_problems_reported(cfg_repo: Path) -> None:
    edit_image(cfg_repo, "cpus: 1", "cpus: 0\nfoo: 1")
    proc = build_py(cfg_repo, "smoke")
    assert proc.returncode == 2
    assert "and 1 more problem" in proc.stderr
    assert "cpus" in proc.stderr and "foo" in proc.stderr


def test_unknown_image(cfg_repo: Path) -> None:
    proc = build_py(cfg_repo, "smok")
    assert proc.returncode == 2
    line = first_error(proc.stderr)
    assert "unknown image 'smok'" in line and "did you mean 'smoke'" in line
    assert not (cfg_repo / "build").exists()


def test_bad_site_file(cfg_repo: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("qemu:\n  acelerator: tcg\nmirror:\n  url: 42\n")
    proc = build_py(cfg_repo, "smoke", "--site", str(site))
    assert proc.returncode == 2
    assert "site.yaml" in proc.stderr
    assert "qemu.acelerator" in proc.stderr and "did you mean 'accelerator'" in proc.stderr
    assert "mirror.url" in proc.stderr
    site.write_text("backend: vmware\n")
    proc = build_py(cfg_repo, "smoke", "--site", str(site))
    assert proc.returncode == 2 and "backend" in first_error(proc.stderr)
    proc = build_py(cfg_repo, "smoke", "--site", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml: no such file" in first_error(proc.stderr)
    assert not (cfg_repo / "build").exists() and not (cfg_repo / "mirror").exists()


def test_missing_provisioner_script(cfg_repo: Path) -> None:
    edit_image(cfg_repo, "script: provision/marker.sh", "script: provision/nope.sh")
    proc = build_py(cfg_repo, "smoke")
    assert proc.returncode == 2
    assert "provisioners[0].script" in first_error(proc.stderr)


def test_bad_release_name(cfg_repo: Path) -> None:
    proc = build_py(cfg_repo, "smoke", "--release", "../evil")
    assert proc.returncode == 2 and "--release" in first_error(proc.stderr)


def test_outside_git_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copytree(PROJECT / "images", plain / "images")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    env.pop("OSIMAGE_ROOT", None)
    proc = subprocess.run([sys.executable, str(PROJECT / "build.py"), "smoke"], cwd=plain,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "not inside a git repository" in first_error(proc.stderr)


def test_help_lists_commands() -> None:
    proc = subprocess.run([sys.executable, str(PROJECT / "build.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for word in ("IMAGE", "--release", "render", "build"):
        assert word in proc.stdout
    proc = subprocess.run([sys.executable, str(PROJECT / "build.py"), "build", "--help"],
                          capture_output=True, text=True)
    assert "--skip-commit" in proc.stdout and "--release" in proc.stdout


def test_render_validates_without_building(cfg_repo: Path, smoke_sources: Path) -> None:
    shutil.copytree(smoke_sources, cfg_repo / "build/sources/smoke")
    proc = build_py(cfg_repo, "render", "smoke")
    assert proc.returncode == 0, proc.stderr
    hcl = cfg_repo / proc.stdout.strip()
    assert hcl.name == "smoke.pkr.hcl" and hcl.is_file()
    text = hcl.read_text()
    assert 'source "qemu" "smoke"' in text
    assert "hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22" in text
    assert not (cfg_repo / "mirror").exists() and not (cfg_repo / "images/smoke/manifest.json"
                                                       ).exists()
