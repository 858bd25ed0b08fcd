"""The usb-installer stick built through libvirt with `libvirt.driver: native`, in the test's own
network namespace (tests/netns_libvirt.py), as tests/test_usb_installer.py builds it with the
qemu backend: the same Debian-made live ISO (tests/usb/make-usb-test-live.sh) booted as a CD
(osimage/backends/libvirt/install.py's live path), the release's payload uploaded by Packer
over SSH to the guest's DHCP address, the stick's disk downloaded from the pool, published and
recorded; then the stick boots by BIOS and installs the payload, as in the qemu test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns_libvirt import NetnsLibvirt, netns_libvirt  # noqa: F401 - the fixture
from tests.test_libvirt_native_build import leftovers, native_site
from tests.test_usb_installer import (  # noqa: F401 - the fixtures
    RELEASE,
    boot_stick,
    payload_bytes,
    usb_live,
    usb_repo,
)

pytestmark = pytest.mark.vm


def test_stick_built_through_native_libvirt(netns_env: NetnsLibvirt, usb_repo: Path,  # noqa: F811
                                            tmp_path: Path) -> None:
    env = netns_env
    native_site(usb_repo, env)
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200",
                "XDG_CACHE_HOME": str(tmp_path / "cache")}
    full_env.pop("OSIMAGE_ROOT", None)
    t0 = time.monotonic()
    proc = env.exec([sys.executable, str(usb_repo / "build.py"), "usb-installer-test",
                     "--release", RELEASE, "--site", str(usb_repo / "site.yaml")],
                    cwd=usb_repo, timeout=600, env=full_env, stdin=subprocess.DEVNULL)
    built_in = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    print(f"usb-installer-test through native libvirt: {built_in:.1f} s")
    for step in ("connect to hypervisor", "upload source to pool", "boot build domain",
                 "fetch payload", "packer build", "download build disk", "publish to mirror"):
        assert f"ok {step} (" in proc.stderr, proc.stderr
    assert "as a CD" in proc.stderr and "(from lease)" in proc.stderr
    assert "stopped by its shutdown_command" in proc.stderr
    assert leftovers(env) == []

    stick = usb_repo / "mirror/builds/usb-installer-test" / RELEASE / "usb-installer-test.raw"
    data = json.loads((usb_repo / "images/usb-installer-test/manifest.json").read_text())
    entry = data["builds"][-1]
    assert entry["builder_type"] == "libvirt-native"
    sha = hashlib.sha256(stick.read_bytes()).hexdigest()
    assert entry["custom_data"]["sha256"]["usb-installer-test.raw"] == sha
    want = hashlib.sha256(payload_bytes()).hexdigest()
    assert entry["custom_data"]["payload"]["sha256"] == want

    # the stick boots by BIOS and writes the payload to the node's disk
    target = tmp_path / "target.raw"
    with target.open("wb") as f:
        f.truncate(64 << 20)
    t1 = time.monotonic()
    console = boot_stick(stick, target, tmp_path / "bios.log", uefi=False)
    print(f"BIOS boot and install of the stick: {time.monotonic() - t1:.1f} s")
    assert f"osimage-install: verified: /dev/vdb holds smoke v1 (release {RELEASE})" in \
        console, console[-3000:]
    assert hashlib.sha256(target.read_bytes()[:len(payload_bytes())]).hexdigest() == want
