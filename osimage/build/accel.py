"""Which accelerator the qemu backend uses: KVM when it really works here, otherwise TCG.

/dev/kvm can exist and still be useless: on these machines (nested virtualisation) a 512-byte
boot sector runs fine under KVM while a Linux kernel hangs before its first line. So 'auto'
boots the host's own kernel under KVM with no root file system; a working KVM reaches the
"Kernel panic" (and qemu exits, -no-reboot) in about a second. Without a kernel in /boot the
boot sector probe is all there is. The answer is cached for the machine's boot (boot_id), so
only the first build after a reboot pays for the probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from osimage.errors import ConfigError
from osimage.fsutil import atomic_write_text
from osimage.runner import child_env

PROBE_TIMEOUT = 4.0

# mov dx,0x3f8; mov al,'K'; out dx,al; mov dx,0xf4; mov al,0; out dx,al; hlt; jmp $-1
_CODE = bytes.fromhex("baf803b04beebaf400b000eef4ebfd")
BOOT_SECTOR = _CODE + bytes(510 - len(_CODE)) + b"\x55\xaa"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_usable(qemu: str = "qemu-system-x86_64", timeout: float = PROBE_TIMEOUT) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists() and not any(
            (modules / m).exists() for m in ("kvm_intel", "kvm_amd")):
        return False  # nested "PVM" KVM: its API works, but real guests stop on emulation errors
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    with tempfile.TemporaryDirectory(prefix="osimage-kvm-") as tmp:
        argv = [qemu, "-accel", "kvm", "-nodefaults", "-display", "none", "-serial", "stdio",
                "-no-reboot"]
        if kernels and os.access(kernels[-1], os.R_OK):
            argv += ["-m", "256", "-kernel", str(kernels[-1]),
                     "-append", "console=ttyS0 panic=-1 loglevel=4"]
            expect_rc, expect_out = 0, b"Kernel panic"
        else:
            disk = Path(tmp) / "probe.img"
            disk.write_bytes(BOOT_SECTOR)
            argv += ["-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                     "-drive", f"file={disk},format=raw,if=ide"]
            # isa-debug-exit makes qemu exit with (value << 1) | 1.
            expect_rc, expect_out = 1, b"K"
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL, process_group=0,
                                    env=child_env())
        except FileNotFoundError:
            return False
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            return False
        return proc.returncode == expect_rc and expect_out in out


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "osimage"


def resolve(wanted: str, qemu: str = "qemu-system-x86_64", cache_dir: Path | None = None) -> str:
    """'kvm' or 'tcg' for the site's setting ('auto', 'kvm' or 'tcg')."""
    cache_dir = cache_dir or cache_home()
    if wanted == "tcg":
        return "tcg"
    if wanted == "kvm":
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise ConfigError("qemu.accelerator: 'kvm' but /dev/kvm is missing or not writable",
                              hint="set qemu.accelerator to 'auto' or 'tcg' in the site file")
        return "kvm"
    cache = cache_dir / "accelerator.json"
    boot = _boot_id()
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["boot_id"] == boot and cached["qemu"] == qemu:
            return str(cached["accelerator"])
    found = "kvm" if kvm_usable(qemu) else "tcg"
    with contextlib.suppress(OSError):  # whole or not at all: another build may read it now
        atomic_write_text(cache, json.dumps({"boot_id": boot, "qemu": qemu,
                                             "accelerator": found}))
    return found
