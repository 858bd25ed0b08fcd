"""./build.py write-usb: a regular file stands in for the stick, and a fake sysroot
(OSIMAGE_WRITE_USB_SYSROOT: sys/class/block, proc/self/mounts, proc/swaps) for what the kernel
says about it. Every refusal leaves the device untouched and exits 2."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from osimage.usb import write as usbwrite
from tests.conftest import PROJECT, build_py, git, make_repo

IMAGE_SIZE = 5 * 2**20 + 7
DEVICE_SIZE = 16 * 2**20


@dataclass
class Stick:
    sysroot: Path
    device: Path
    block: Path

    @property
    def env(self) -> dict[str, str]:
        return {"OSIMAGE_WRITE_USB_SYSROOT": str(self.sysroot)}

    def untouched(self) -> bool:
        return self.device.read_bytes() == b"\0" * DEVICE_SIZE

    def mounts(self, text: str) -> None:
        (self.sysroot / "proc/self/mounts").write_text(text)

    def partition(self, name: str) -> Path:
        part = self.block / name
        part.mkdir()
        (part / "partition").write_text("1\n")
        (self.sysroot / "sys/class/block" / name).symlink_to(part)
        return part


@pytest.fixture
def stick(tmp_path: Path) -> Stick:
    sysroot = tmp_path / "sysroot"
    block = sysroot / "sys/class/block/sdz"
    (block / "device").mkdir(parents=True)
    (block / "holders").mkdir()
    (block / "removable").write_text("1\n")
    (block / "size").write_text(f"{DEVICE_SIZE // 512}\n")
    (block / "device/vendor").write_text("Kingston\n")
    (block / "device/model").write_text("DataTraveler 3.0\n")
    (sysroot / "proc/self").mkdir(parents=True)
    (sysroot / "proc/self/mounts").write_text("/dev/vda1 / ext4 rw 0 0\n")
    (sysroot / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    device = tmp_path / "dev" / "sdz"
    device.parent.mkdir()
    device.write_bytes(b"\0" * DEVICE_SIZE)
    return Stick(sysroot=sysroot, device=device, block=block)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "usb-installer.raw"
    data = random.Random(11).randbytes(IMAGE_SIZE)
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(
        f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


def write_usb(*args: str, env: dict[str, str] | None = None,
              repo: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    return build_py(repo, "write-usb", *args, env=env)


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error:"))


def test_writes_and_reads_back(stick: Stick, image: Path) -> None:
    proc = write_usb(str(image), str(stick.device), "--yes", env=stick.env)
    assert proc.returncode == 0, proc.stderr
    want = hashlib.sha256(image.read_bytes()).hexdigest()
    assert f"written and read back, sha256 {want} (as recorded)" in proc.stdout
    assert "Kingston DataTraveler 3.0" in proc.stderr
    written = stick.device.read_bytes()
    assert written[:IMAGE_SIZE] == image.read_bytes()
    assert written[IMAGE_SIZE:] == b"\0" * (DEVICE_SIZE - IMAGE_SIZE)


@pytest.mark.parametrize(("setup", "message"), [
    ("not-removable", "is not a removable disk; nothing was written"),
    ("mounted", "/dev/sdz1 is mounted at /media/my stick"),
    ("swap", "/dev/sdz2 is used as swap"),
    ("held", "/dev/sdz is held by dm-0"),
])
def test_refuses_a_disk_in_use_or_not_removable(stick: Stick, image: Path, setup: str,
                                                message: str) -> None:
    if setup == "not-removable":
        (stick.block / "removable").write_text("0\n")
    elif setup == "mounted":
        stick.partition("sdz1")
        stick.mounts("/dev/vda1 / ext4 rw 0 0\n/dev/sdz1 /media/my\\040stick vfat rw 0 0\n")
    elif setup == "swap":
        stick.partition("sdz2")
        (stick.sysroot / "proc/swaps").write_text(
            "Filename Type Size Used Priority\n/dev/sdz2 partition 1024 0 -2\n")
    else:
        (stick.block / "holders/dm-0").mkdir()
    proc = write_usb(str(image), str(stick.device), "--yes", env=stick.env)
    assert proc.returncode == 2, proc.stderr
    assert message in first_error(proc.stderr)
    assert "--force" in proc.stderr
    assert stick.untouched()

    # --force writes it all the same, and says what it overrode
    proc = write_usb(str(image), str(stick.device), "--yes", "--force", env=stick.env)
    assert proc.returncode == 0, proc.stderr
    assert "(--force)" in proc.stderr
    assert stick.device.read_bytes()[:IMAGE_SIZE] == image.read_bytes()


def test_refuses_a_partition_and_a_small_disk_even_with_force(stick: Stick, image: Path,
                                                              tmp_path: Path) -> None:
    part = stick.partition("sdz1")
    (part / "size").write_text("2048\n")
    node = tmp_path / "dev" / "sdz1"
    node.write_bytes(b"")
    proc = write_usb(str(image), str(node), "--yes", "--force", env=stick.env)
    assert proc.returncode == 2, proc.stderr
    assert "is a partition of /dev/sdz: give the whole disk, /dev/sdz" in first_error(proc.stderr)

    (stick.block / "size").write_text("2048\n")  # 1 MiB
    proc = write_usb(str(image), str(stick.device), "--yes", "--force", env=stick.env)
    assert proc.returncode == 2, proc.stderr
    assert "holds 1.0 MiB" in first_error(proc.stderr) and "needs 5.0 MiB" in proc.stderr
    assert stick.untouched()


def test_needs_yes_without_a_terminal(stick: Stick, image: Path) -> None:
    proc = write_usb(str(image), str(stick.device), env=stick.env)  # stdin is not a terminal
    assert proc.returncode == 2, proc.stderr
    assert "no confirmation: there is no terminal to ask on; pass --yes" in first_error(proc.stderr)
    assert stick.untouched()


@pytest.mark.parametrize(("answer", "status"), [("no", 2), ("yes", 0)])
def test_asks_on_a_terminal(stick: Stick, image: Path, answer: str, status: int) -> None:
    import os

    import pexpect

    child = pexpect.spawn(sys.executable, [str(PROJECT / "build.py"), "write-usb", str(image),
                                           str(stick.device)],
                          env={**os.environ, **stick.env, "NO_COLOR": "1"}, cwd=str(PROJECT),
                          timeout=60, encoding="utf-8")
    child.expect("Everything on it is lost. Type yes")
    assert "Kingston DataTraveler 3.0" in (child.before or "")
    child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status, child.before
    assert stick.untouched() == (answer == "no")


def test_refuses_what_is_not_a_block_device(image: Path, tmp_path: Path) -> None:
    """Without the test sysroot, a regular file is no device."""
    target = tmp_path / "not-a-disk"
    target.write_bytes(b"\0" * 1024)
    proc = write_usb(str(image), str(target), "--yes")
    assert proc.returncode == 2, proc.stderr
    assert "is not a block device" in first_error(proc.stderr)
    proc = write_usb(str(image), str(tmp_path / "nope"), "--yes")
    assert proc.returncode == 2 and "no such device" in proc.stderr


def test_a_damaged_image_fails_after_writing(stick: Stick, image: Path) -> None:
    data = bytearray(image.read_bytes())
    data[100] ^= 1
    image.write_bytes(bytes(data))  # the .sha256 beside it still has the old sum
    proc = write_usb(str(image), str(stick.device), "--yes", env=stick.env)
    assert proc.returncode == 1, proc.stderr
    assert "the image is damaged" in first_error(proc.stderr)


def test_read_back_sees_what_the_device_holds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(random.Random(5).randbytes(3 << 20))
    dev = tmp_path / "dev"
    dev.write_bytes(b"\0" * (4 << 20))
    written = usbwrite.write_image(src, 3 << 20, dev, is_block=False, exclusive=True,
                                   on_progress=lambda n: None)
    assert written == hashlib.sha256(src.read_bytes()).hexdigest()
    assert usbwrite.read_back(dev, 3 << 20, lambda n: None) == written
    with dev.open("r+b") as f:
        f.seek(2 << 20)
        f.write(b"\xff")
    assert usbwrite.read_back(dev, 3 << 20, lambda n: None) != written


def test_writes_an_image_of_a_release_from_the_mirror(stick: Stick, tmp_path: Path) -> None:
    """IMAGE by name: its file in --release X, with the sha256 the release records."""
    repo = make_repo(tmp_path / "repo")
    data = random.Random(2).randbytes(IMAGE_SIZE)
    path = repo / "mirror/builds/smoke/v1/smoke.raw"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    proc = build_py(repo, "release", "set", "3.0", "smoke", "--commit", "HEAD", "--version", "v1",
                    "--file", "smoke.raw")
    assert proc.returncode == 0, proc.stderr
    git(repo, "commit", "-qam", "release 3.0")
    proc = write_usb("smoke", str(stick.device), "--release", "3.0", "--yes", env=stick.env,
                     repo=repo)
    assert proc.returncode == 0, proc.stderr
    assert "smoke v1 (release 3.0) written and read back" in proc.stdout
    assert stick.device.read_bytes()[:IMAGE_SIZE] == data

    proc = write_usb("smoke", str(stick.device), "--release", "4.0", "--yes", env=stick.env,
                     repo=repo)
    assert proc.returncode == 2 and "no release '4.0'" in proc.stderr

    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the mirror's copy went bad
    proc = write_usb("smoke", str(stick.device), "--release", "3.0", "--yes", env=stick.env,
                     repo=repo)
    assert proc.returncode == 1, proc.stderr
    assert "the image is damaged" in first_error(proc.stderr)
