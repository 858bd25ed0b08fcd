"""The smoke guest's shutdown is quick and clean; the machine's cached probes are trusted only
for the binary they were made with.

The smoke image is built by dozens of tests: its guest's shutdown used to take 3 s of fixed
sleeps (rc.shutdown's own, then busybox init's two). One boot of the smoke disk under plain
qemu checks the fast path: /sbin/poweroff (the image's shutdown_command) stops the processes,
unmounts /data and powers off at once, and what was written to /data is on the disk, clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from osimage.build import accel
from tests.servers import free_port

P2_OFFSET = 67108864  # the smoke disk's data partition (scripts/make-smoke-disk.sh)
BUSYBOX_INIT_SLOW_PATH = "Sent SIGKILL to all processes"  # busybox init's own shutdown


def _ssh(key: Path, port: int, command: str,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_poweroff_is_fast_and_leaves_data_clean(tmp_path: Path, smoke_sources: Path) -> None:
    disk = tmp_path / "smoke.qcow2"
    shutil.copy(smoke_sources / "smoke.qcow2", disk)
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    serial = tmp_path / "serial.log"
    port = free_port()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "type=pc,accel=tcg", "-m", "256M",
         "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
         "-drive", f"file={disk},if=virtio,format=qcow2",
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
         "-device", "virtio-net,netdev=n0",
         "-fw_cfg", f"name=opt/osimage/authorized_keys,file={key}.pub"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        process_group=0)
    try:
        deadline = time.monotonic() + 120
        while True:
            up = _ssh(key, port, "echo fast >/data/fast-marker && sync && echo up")
            if up.stdout.strip() == "up" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert up.stdout.strip() == "up", up.stderr
        t0 = time.monotonic()
        _ssh(key, port, "/sbin/poweroff")
        qemu.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if qemu.poll() is None:
            os.killpg(qemu.pid, 9)
            qemu.wait()
    console = serial.read_text(errors="replace")
    print(f"from /sbin/poweroff to qemu's exit: {elapsed:.2f} s")
    assert qemu.returncode == 0, qemu.stderr.read().decode() if qemu.stderr else ""
    assert "smoke: /data unmounted, powering off" in console
    assert BUSYBOX_INIT_SLOW_PATH not in console
    assert elapsed < 2.5  # busybox init alone sleeps 2 s, rc.shutdown used to sleep 1 s more

    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    data = f"{raw}?offset={P2_OFFSET}"
    fsck = subprocess.run(["e2fsck", "-fn", data], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    marker = subprocess.run(["debugfs", "-R", "cat /fast-marker", data], capture_output=True,
                            text=True)
    assert marker.stdout == "fast\n"


def test_cached_accelerator_holds_only_for_the_same_qemu(tmp_path: Path) -> None:
    """An answer cached for another qemu binary (same name, replaced since) is probed again."""
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\nexit 1\n")  # a qemu that cannot run a guest: KVM unusable
    qemu.chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (cache / "accelerator.json").write_text(json.dumps(
        {"boot_id": boot_id, "qemu": str(qemu), "qemu_key": "/elsewhere:1:1",
         "accelerator": "kvm"}))
    assert accel.resolve("auto", str(qemu), cache) == "tcg"
    written = json.loads((cache / "accelerator.json").read_text())
    assert written["accelerator"] == "tcg"
    assert written["qemu_key"] == accel.binary_key(str(qemu))
    # and the answer now cached is used as it is
    assert accel.resolve("auto", str(qemu), cache) == "tcg"
    assert sorted(p.name for p in cache.iterdir()) == ["accelerator.json"]
