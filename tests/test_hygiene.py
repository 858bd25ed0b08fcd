"""Hygiene around the build: secrets stay out of child processes, a new mirror host key is
trusted only on the command line, the write-usb test override cannot reach a real device,
image.yaml cannot name files outside its image folder, the validation cache cannot skip a
document jsonschema would refuse, and Packer's HTTP server listens on loopback only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osimage.build import pipeline, steps
from osimage.ui import Reporter
from tests.conftest import build_py, git
from tests.servers import HTTPServer, SSHServer

SECRET = "s3cret-registry-password"


def errors_only(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --- secrets never reach a child -------------------------------------------------------------


def observer(folder: Path, name: str, real: str) -> Path:
    """An executable that writes down its environment and then runs the real program: only
    to observe what the real one is given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\nenv > \"$OSIMAGE_TEST_DUMPS/{name}.$$.env\"\n"
                    f"[ \"$1\" = build ] && echo $$ > \"$OSIMAGE_TEST_DUMPS/{name}.build.pid\"\n"
                    f"exec {real} \"$@\"\n")
    path.chmod(0o755)
    return path


def listening(pgid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket a process of the group listens on (IPv4 and 6)."""
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                    continue
                addr, port = f[1].split(":")
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_build_children_see_no_secret_and_http_on_loopback(repo: Path, tmp_path: Path) -> None:
    """A real smoke build with a registry password in the environment and an http_directory
    the guest fetches a file from: neither packer, ssh-keygen nor git gets the password, and every
    socket Packer's process group listens on (its HTTP server among them) is on 127.0.0.1."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    bin_dir = tmp_path / "bin"
    packer = observer(bin_dir, "packer", shutil.which("packer") or "/usr/bin/packer")
    observer(bin_dir, "ssh-keygen", shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen")
    observer(bin_dir, "git", shutil.which("git") or "/usr/bin/git")
    (repo / "site.yaml").write_text(f"packer:\n  binary: {packer}\n")
    image = repo / "images" / "smoke"
    (image / "http").mkdir()
    (image / "http" / "hello.txt").write_text("served to the guest\n")
    text = (image / "image.yaml").read_text()
    text = text.replace("provisioners:\n", "http_directory: http\nprovisioners:\n"
                        "  - name: fetch\n    type: shell\n    inline:\n"
                        "      - wget -q -O /data/hello.txt \"http://$PACKER_HTTP_ADDR/hello.txt\""
                        "\n      - cat /data/hello.txt\n", 1)
    (image / "image.yaml").write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "smoke with an http_directory")

    sockets: set[tuple[str, int]] = set()
    done = threading.Event()

    def watch() -> None:
        pid_file = dumps / "packer.build.pid"
        while not done.is_set():
            if pid_file.exists() and pid_file.read_text().strip():
                sockets.update(listening(int(pid_file.read_text())))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        env = {"OSIMAGE_REGISTRY_PASSWORD": SECRET, "OSIMAGE_REGISTRY_USERNAME": "builder",
               "OSIMAGE_TEST_DUMPS": str(dumps),
               "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        proc = build_py(repo, "smoke", "--no-publish", env=env, timeout=600)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [p.read_text() for p in (repo / "build" / "smoke").glob("*/packer.log")]
    assert any("served to the guest" in log for log in logs)  # the guest fetched it
    seen = sorted(p.name for p in dumps.glob("*.env"))
    assert any(n.startswith("packer.") for n in seen) and any(
        n.startswith("ssh-keygen.") for n in seen) and any(n.startswith("git.") for n in seen), seen
    for dump in dumps.glob("*.env"):
        assert SECRET not in dump.read_text(), dump.name
        assert "OSIMAGE_REGISTRY" not in dump.read_text(), dump.name
    # Packer's HTTP server (8000-9000), the SSH forward and VNC: loopback only
    assert any(8000 <= port <= 9000 for _addr, port in sockets), sockets
    assert {addr for addr, _port in sockets} == {"127.0.0.1"}, sockets


def test_runner_keeps_secrets_from_children(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way osimage runs a command: run() and output(); what the caller passes in env=
    on purpose does reach the child."""
    from osimage import runner

    monkeypatch.setenv("OSIMAGE_REGISTRY_PASSWORD", SECRET)
    monkeypatch.setenv("OSIMAGE_MIRROR_TOKEN", SECRET + "2")
    dump = tmp_path / "env"
    runner.run(["sh", "-c", f"env > {dump}"])
    assert SECRET not in dump.read_text()
    assert SECRET not in runner.output(["env"])
    runner.run(["sh", "-c", f"env > {dump}"], env={"GIVEN": SECRET})
    assert f"GIVEN={SECRET}" in dump.read_text()
    assert "OSIMAGE_REGISTRY_PASSWORD" not in dump.read_text()


# --- host keys -------------------------------------------------------------------------------


def test_environment_does_not_trust_a_new_host_key(repo: Path, tmp_path: Path) -> None:
    """OSIMAGE_ACCEPT_NEW_HOST_KEY=1 inherited from a shell or CI trusts nothing: the build
    refuses the SSH mirror's unknown key before any VM starts and known_hosts stays empty.
    The command-line flag does trust it (Packer then fails, injected: no VM is needed)."""
    known = tmp_path / "known_hosts"
    known.write_text("")
    failing = tmp_path / "bin" / "packer"
    failing.parent.mkdir()
    real = shutil.which("packer") or "/usr/bin/packer"
    failing.write_text("#!/bin/sh\n"
                       "[ \"$1\" = build ] && { echo injected failure; exit 1; }\n"
                       f"exec {real} \"$@\"\n")
    failing.chmod(0o755)
    with SSHServer() as ssh, HTTPServer(ssh.root) as http:
        site = tmp_path / "site.yaml"
        site.write_text(f"packer:\n  binary: {failing}\nmirror:\n  url: {ssh.url}\n"
                        f"  http: {http.url}/\n  identity_file: {ssh.client_key}\n"
                        f"  known_hosts: {known}\n")
        proc = build_py(repo, "smoke", "--site", str(site),
                        env={"OSIMAGE_ACCEPT_NEW_HOST_KEY": "1"})
        assert proc.returncode == 1, proc.stderr
        assert "unknown host key" in proc.stderr and "packer build" not in proc.stderr
        assert known.read_text() == ""
        flag = build_py(repo, "smoke", "--site", str(site), "--accept-new-host-key")
        assert flag.returncode == 1 and "injected failure" in flag.stderr, flag.stderr
        assert known.read_text() == f"{ssh.host_pattern} {ssh.host_public}\n"
    assert not (ssh.root / "builds").exists()


# --- write-usb -------------------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real block device (a loop device over a file of the test's own) and its file."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\0" * (16 << 20))
    try:
        out = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                             capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no loop device: {e}")
    device = Path(out.stdout.strip())
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


def test_write_usb_sysroot_ignored_for_a_block_device(tmp_path: Path,
                                                      loop_device: tuple[Path, Path]) -> None:
    """The test sysroot says the loop device is a free removable stick; the real /sys says it
    is not removable: the real one decides, nothing is written."""
    device, backing = loop_device
    name = device.name
    sysroot = tmp_path / "sysroot"
    block = sysroot / "sys/class/block" / name
    (block / "holders").mkdir(parents=True)
    (block / "removable").write_text("1\n")
    (block / "size").write_text(f"{(16 << 20) // 512}\n")
    (sysroot / "proc/self").mkdir(parents=True)
    (sysroot / "proc/self/mounts").write_text("")
    (sysroot / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    assert Path(f"/sys/class/block/{name}/removable").read_text().strip() == "0"
    image = tmp_path / "disk.raw"
    data = random.Random(5).randbytes(1 << 20)
    image.write_bytes(data)
    (tmp_path / "disk.raw.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  disk.raw\n")
    proc = build_py(Path(__file__).resolve().parent.parent, "write-usb", str(image),
                    str(device), "--yes", env={"OSIMAGE_WRITE_USB_SYSROOT": str(sysroot)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {device} is not a removable disk" in proc.stderr
    assert backing.read_bytes() == b"\0" * (16 << 20)


# --- image.yaml paths ------------------------------------------------------------------------


@pytest.mark.parametrize(("edit", "message"), [
    ("script", "provisioners[0].script: '../../etc/passwd' is outside images/smoke/"),
    ("symlink", "provisioners[0].script: 'provision/escape.sh' is outside images/smoke/"),
    ("http", "http_directory: 'http' is outside images/smoke/"),
    ("patches", "patches.apply.script: '/etc/passwd' is outside images/smoke/"),
    ("prepare", "source.prepare: '../outside.sh' is outside the repository"),
])
def test_image_paths_stay_inside(repo: Path, tmp_path: Path, edit: str, message: str) -> None:
    image = repo / "images" / "smoke"
    yaml = image / "image.yaml"
    text = yaml.read_text()
    if edit == "script":
        text = text.replace("script: provision/marker.sh", "script: ../../etc/passwd")
    elif edit == "symlink":
        (image / "provision" / "escape.sh").symlink_to("/etc/passwd")
        text = text.replace("script: provision/marker.sh", "script: provision/escape.sh")
    elif edit == "http":
        (tmp_path / "elsewhere").mkdir()
        (image / "http").symlink_to(tmp_path / "elsewhere")
        text = text.replace("provisioners:\n", "http_directory: http\nprovisioners:\n", 1)
    elif edit == "patches":
        text = text.replace("script: patches/apply.sh", "script: /etc/passwd")
    else:
        (repo.parent / "outside.sh").write_text("#!/bin/sh\n")
        text = text.replace("prepare: scripts/make-smoke-disk.sh", "prepare: ../outside.sh")
    yaml.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "escape")
    before = sorted(p.name for p in repo.iterdir())
    proc = build_py(repo, "render", "smoke")
    assert proc.returncode == 2, proc.stderr
    assert errors_only(proc.stderr) == [f"error: images/smoke/image.yaml: {message} (paths are "
                                        f"relative to {message.split(' is outside ')[1]} and "
                                        f"must stay inside it)"]
    assert sorted(p.name for p in repo.iterdir()) == before  # nothing made (no build/)


# --- the validation cache --------------------------------------------------------------------


def test_validation_cache_tells_a_date_from_a_string(repo: Path, tmp_path: Path) -> None:
    """'2024-01-01' (a string) passes and is remembered; 2024-01-01 (a YAML date) is another
    document, and jsonschema refuses it."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    yaml = repo / "images" / "smoke" / "image.yaml"
    base = yaml.read_text()
    desc = next(line for line in base.splitlines() if line.startswith("description:"))

    def render(value: str) -> subprocess.CompletedProcess[str]:
        yaml.write_text(base.replace(desc, f"description: {value}"))
        git(repo, "commit", "-q", "-am", value)
        return build_py(repo, "render", "smoke", env=env)

    first = render("'2024-01-01'")
    assert first.returncode == 0, first.stderr
    assert any((tmp_path / "cache" / "osimage" / "valid-config").iterdir())
    second = render("2024-01-01")
    assert second.returncode == 2, second.stdout + second.stderr
    assert errors_only(second.stderr) == [
        "error: images/smoke/image.yaml: description: must be a string, not date"]


# --- the inputs hash -------------------------------------------------------------------------


def test_inputs_hash_covers_the_prepare_script(repo: Path) -> None:
    """smoke's source is made by scripts/make-smoke-disk.sh, outside the image folder: a
    change to it is a change of the build's inputs."""

    def inputs() -> str:
        ctx = pipeline.prepare(repo, pipeline.BuildOptions(image="smoke", skip_commit=True),
                               Reporter(quiet=True))
        ctx.source_checksum = "sha256:" + "0" * 64
        return steps.inputs_hash(ctx)

    before = inputs()
    assert inputs() == before
    script = repo / "scripts" / "make-smoke-disk.sh"
    script.write_text(script.read_text() + "# changed\n")
    assert inputs() != before
