"""--debug and --break-before/after, driven for real in a pseudo-terminal with pexpect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.conftest import build_py, git, qemu_pids

LOGIN = re.compile(r"ssh -i (\S+) -p (\d+) [^\r\n]*root@127\.0\.0\.1")
PAUSE = "Press enter to continue"
ASK = r"\[c\] Clean up and exit, \[a\] abort without cleanup"


def spawn(repo: Path, *args: str) -> pexpect.spawn[str]:
    child = pexpect.spawn(sys.executable, [str(repo / "build.py"), *args], cwd=str(repo),
                          encoding="utf-8", timeout=90, dimensions=(50, 220),
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                               "HOME": str(Path.home()), "TERM": "xterm"})
    return child


def matched(child: pexpect.spawn[str]) -> str:
    m = child.match
    assert isinstance(m, re.Match)
    return str(m.group(0))


def ssh(login: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*login.split(), "-o", "BatchMode=yes", command], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.vm
def test_debug_steps_logs_in_and_finishes(repo: Path) -> None:
    before = qemu_pids(repo)
    child = spawn(repo, "smoke", "--debug")
    login = None
    pauses = 0
    while True:
        i = child.expect([PAUSE, LOGIN, pexpect.EOF])
        if i == 0:
            pauses += 1
            child.send("\r")  # the Enter key
        elif i == 1:
            login = matched(child)
            # log in with the printed command, as a person would, while the build waits
            out = ssh(login, "cat /etc/hostname; echo debug-was-here > /data/debug")
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "smoke"
        else:
            break
    child.close()
    assert child.exitstatus == 0, str(child.before)
    assert login is not None and pauses >= 5
    commit = git(repo, "rev-parse", "HEAD").strip()
    disk = repo / "build/smoke" / f"g{commit[:10]}-debug" / "output" / "smoke.qcow2"
    assert disk.is_file() and disk.with_name("smoke.qcow2.sha256").is_file()
    # never published, never recorded, the key is gone, no VM left
    assert not (repo / "mirror/builds").exists() or not any((repo / "mirror/builds").iterdir())
    assert not (repo / "images/smoke/manifest.json").exists()
    assert not Path(LOGIN.search(login).group(1)).exists()  # type: ignore[union-attr]
    assert not (qemu_pids(repo) - before)


@pytest.mark.vm
def test_break_after_pauses_there_only(repo: Path) -> None:
    child = spawn(repo, "smoke", "--break-after", "marker")
    child.expect(LOGIN)
    login = matched(child)
    child.expect(PAUSE)
    assert "paused after step 'marker'" in str(child.before)
    out = ssh(login, "cat /data/marker")  # the step before the pause has run
    assert out.returncode == 0 and "osimage smoke marker" in out.stdout
    child.send("\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.vm
def test_debug_failed_step_abort_leaves_nothing(repo: Path) -> None:
    (repo / "images/smoke/provision/marker.sh").write_text("#!/bin/sh\necho broken >&2\nexit 7\n")
    git(repo, "commit", "-qam", "break the provisioner")
    before = qemu_pids(repo)
    child = spawn(repo, "smoke", "--debug")
    while True:
        i = child.expect([PAUSE, ASK])
        if i == 0:
            child.send("\r")
            continue
        # the VM is kept while the question is open
        assert qemu_pids(repo) - before, "the VM should still run while packer asks"
        child.send("a\r")
        break
    while child.expect([PAUSE, pexpect.EOF]) == 0:  # -debug pauses before each cleanup too
        child.send("\r")
    child.close()
    assert child.exitstatus == 1, str(child.before)
    assert not (qemu_pids(repo) - before), "abort must still leave no qemu behind"
    assert not list((repo / "build/smoke").glob("*/output"))
    assert not (repo / "images/smoke/manifest.json").exists()


def test_debug_without_terminal_refuses(repo: Path) -> None:
    proc = build_py(repo, "smoke", "--debug")  # stdin is /dev/null, stdout a pipe
    assert proc.returncode == 2
    assert "--debug needs a terminal" in proc.stderr
    proc = build_py(repo, "smoke", "--break-after", "marker")
    assert proc.returncode == 2 and "needs a terminal" in proc.stderr
    assert not (repo / "build/smoke").exists()


def test_break_names_a_real_step(repo: Path) -> None:
    proc = build_py(repo, "smoke", "--break-before", "markr")
    assert proc.returncode == 2
    assert "no provisioner named 'markr'" in proc.stderr and "did you mean 'marker'" in proc.stderr

