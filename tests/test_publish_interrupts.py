"""Interrupts never publish (issue 13.3) and messages tell the truth (13.4): real signals sent
mid-upload to a real sshd mirror, a Ctrl-C to the whole process group, a failed HTTP check
after the rename, a lost terminal during --debug; the kept build is published later with
`./build.py publish IMAGE VERSION`, which sends only what the mirror does not have."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from osimage.publish import artifacts
from tests.conftest import build_py, git, qemu_pids, under_load
from tests.servers import HTTPServer, SSHServer
from tests.test_immutable import errors_of, kept_build, ssh_site

MiB = 1 << 20
ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


@pytest.fixture
def ssh() -> Iterator[SSHServer]:
    with SSHServer() as server:
        yield server


def final_names(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if folder.is_dir() else []


def wait_for_partial(folder: Path, size: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the upload never started"
        if folder.is_dir():
            sizes = [(folder / n).stat().st_size for n in os.listdir(folder)
                     if n.startswith(".smoke.qcow2.partial-")]
            if sizes and max(sizes) >= size:
                return
        time.sleep(0.01)


@pytest.mark.parametrize("sig", ["SIGINT to the group", "SIGTERM", "SIGHUP"])
def test_signal_mid_upload_stops_at_once_and_publishes_nothing(
        repo: Path, ssh: SSHServer, sig: str) -> None:
    art = kept_build(repo, "1.0", 512 * MiB, b"big")
    target = ssh.root / "builds/smoke/1.0"
    with HTTPServer(ssh.root) as http:
        site = ssh_site(repo, ssh, http.url)
        proc = subprocess.Popen([sys.executable, str(repo / "build.py"), "publish", "smoke",
                                 "1.0", "--site", str(site)], cwd=repo, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # its own process group, as a shell's job
        wait_for_partial(target, 24 * MiB, proc)
        t0 = time.monotonic()
        if sig == "SIGINT to the group":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            os.kill(proc.pid, getattr(signal, sig))
        _, err = proc.communicate(timeout=30)
        stopped = time.monotonic() - t0
        assert proc.returncode == 130, err
        print(f"{sig}: stopped {stopped:.3f} s after the signal")
        assert stopped < under_load(1.0), f"took {stopped:.2f} s to stop"
        assert "Traceback" not in err
        [line] = errors_of(err)
        assert line.startswith("error: interrupted by SIG"), line
        time.sleep(0.5)  # nothing may be renamed into place after the signal, even later
        assert final_names(target) == []
        assert not (ssh.root / "builds/smoke/.1.0.publish-lock").exists()
        if sig != "SIGHUP":
            return
        # the build is kept: publishing it again resumes the partial upload
        again = build_py(repo, "publish", "smoke", "1.0", "--site", str(site))
    assert again.returncode == 0, again.stderr
    sent = re.search(r"sent ([\d.]+) MiB, resumed ([\d.]+) MiB", again.stderr)
    assert sent is not None, again.stderr
    assert float(sent.group(2)) >= 20 and float(sent.group(1)) < 512 - 20
    assert final_names(target) == ["smoke.qcow2", "smoke.qcow2.sha256"]
    assert artifacts.hash_file(target / "smoke.qcow2") == (art.size, art.sha256)
    recorded = json.loads((repo / "images/smoke/manifest.json").read_text())["builds"]
    assert [b["custom_data"]["sha256"] for b in recorded] == [{"smoke.qcow2": art.sha256}]
    assert not (repo / "build/smoke/1.0/publish.json").exists()


@pytest.mark.vm
def test_failed_http_check_leaves_nothing_published_and_the_build_kept(
        repo: Path, ssh: SSHServer, tmp_path: Path) -> None:
    version = f"g{git(repo, 'rev-parse', 'HEAD').strip()[:10]}"
    target = ssh.root / "builds/smoke" / version
    # the web server answers the check before the VM (a probe at the mirror's root) but not
    # for builds/: the HTTP check after the upload fails
    with HTTPServer(ssh.root, hide="/builds/") as wrong:
        proc = build_py(repo, "smoke", "--site", str(ssh_site(repo, ssh, wrong.url)))
    assert proc.returncode == 1, proc.stderr
    [line] = errors_of(proc.stderr)
    assert "mirror HTTP check" in line and "404" in line, line
    assert final_names(target) == []  # renamed back: no file that no manifest records
    assert not (repo / "images/smoke/manifest.json").exists()
    kept = repo / "build/smoke" / version / "output" / "smoke.qcow2"
    assert kept.is_file()
    assert f"./build.py publish smoke {version}" in proc.stderr
    assert "resumes where it stopped" not in proc.stderr
    with HTTPServer(ssh.root) as http:
        again = build_py(repo, "publish", "smoke", version, "--site",
                         str(ssh_site(repo, ssh, http.url)))
    assert again.returncode == 0, again.stderr
    size = kept.stat().st_size
    sent = re.search(r"sent ([\d.]+) MiB, resumed ([\d.]+) MiB", again.stderr)
    assert sent is not None and float(sent.group(1)) < 2.1, again.stderr  # the tail only
    assert final_names(target) == [  # the disk, its package list and SBOM (issue 17)
        "smoke.cdx.json", "smoke.cdx.json.sha256", "smoke.packages.json",
        "smoke.packages.json.sha256", "smoke.qcow2", "smoke.qcow2.sha256"]
    assert artifacts.hash_file(target / "smoke.qcow2")[0] == size
    recorded = json.loads((repo / "images/smoke/manifest.json").read_text())["builds"]
    assert [b["custom_data"]["version"] for b in recorded] == [version]
    # recorded as published, where it was published: release record takes it
    assert recorded[0]["custom_data"]["published"] is True
    assert recorded[0]["custom_data"]["mirror_path"] == f"builds/smoke/{version}"


@pytest.mark.vm
@pytest.mark.parametrize("moment", ["starting", "==> prepare source", "==> make build key",
                                    "Waiting for SSH"])
def test_ctrl_c_to_the_process_group_prints_no_traceback(repo: Path, moment: str) -> None:
    before = qemu_pids(repo)
    proc = subprocess.Popen([sys.executable, str(repo / "build.py"), "smoke"], cwd=repo, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    seen = []
    if moment == "starting":
        time.sleep(0.15)  # Python is importing the project
    else:
        for line in proc.stdout:
            seen.append(line)
            if moment in line:
                break
        else:
            pytest.fail("the build ended first:\n" + "".join(seen))
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(seen) + rest
    # -SIGINT: the signal came before Python installed its handler, as a shell shows it: 130
    assert proc.returncode in ((130, -signal.SIGINT) if moment == "starting" else (130,)), out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert not (qemu_pids(repo) - before)
    assert not list((repo / "build/smoke").glob("*/output"))


LOGIN = re.compile(r"ssh -i (\S+) -p (\d+) [^\r\n]*root@127\.0\.0\.1")


def key_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("osimage-smoke-key-*")}


@pytest.mark.vm
def test_lost_terminal_during_debug_cleans_up(repo: Path) -> None:
    before_vms = qemu_pids(repo)
    child = pexpect.spawn(sys.executable, [str(repo / "build.py"), "smoke", "--debug"],
                          cwd=str(repo), encoding="utf-8", timeout=120, dimensions=(50, 220),
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                               "HOME": str(Path.home()), "TERM": "xterm"})
    while child.expect(["Press enter to continue", LOGIN]) == 0:
        child.send("\r")
    match = child.match
    assert isinstance(match, re.Match)
    key = Path(match.group(1))
    assert key.exists() and qemu_pids(repo) - before_vms
    # the terminal is gone: closing its master side makes the kernel hang up the session
    child.ptyproc.fileobj.close()  # type: ignore[attr-defined]
    t0 = time.monotonic()
    while child.isalive() and time.monotonic() < t0 + 60:
        time.sleep(0.1)
    assert not child.isalive(), "the build kept running without its terminal"
    print(f"stopped {time.monotonic() - t0:.1f} s after the hangup")
    assert child.exitstatus == 130, child.status
    assert not key.parent.exists(), "the key folder was left behind"
    assert key.parent.name not in key_folders()
    assert not (qemu_pids(repo) - before_vms), "the VM was left running"
    assert not list((repo / "build/smoke").glob("*/output")), "output left behind"
    assert not (repo / "images/smoke/manifest.json").exists()
