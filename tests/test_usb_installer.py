"""images/usb-installer: a release's disk embedded in a bootable stick, and the stick's installer.

End to end with a small payload instead of rocky8-base and a Debian-made live ISO instead of
Alpine's (tests/usb/): ./build.py builds the stick with the same compose.sh phases and installer
as the production image, write-usb writes it to a stand-in device, and the stick boots under
qemu (TCG) by BIOS and by UEFI, writes the payload to a second disk and verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT, build_py, git, make_repo, qemu_pids

LIVE_SCRIPT = PROJECT / "tests" / "usb" / "make-usb-test-live.sh"
INSTALLER = PROJECT / "images" / "usb-installer" / "installer" / "osimage-install"
RELEASE = "1.0-test"
PAYLOAD_SIZE = 3 * 2**20 + 123  # not a whole number of blocks
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SITE = "qemu:\n  accelerator: tcg\n"  # no KVM probe: the stick boots under TCG anyway


def payload_bytes() -> bytes:
    return random.Random(7).randbytes(PAYLOAD_SIZE)


@pytest.fixture(scope="session")
def usb_live(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' live ISO, made once by its script."""
    out = tmp_path_factory.mktemp("usb-live")
    subprocess.run([str(LIVE_SCRIPT), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def usb_repo(tmp_path: Path, usb_live: Path) -> Path:
    """A clone with images/usb-installer-test, its live ISO prepared, and release 1.0-test whose
    smoke entry is a small raw file on the local mirror."""
    root = make_repo(tmp_path / "repo")
    test_image = root / "images/usb-installer-test"
    shutil.copytree(PROJECT / "tests/usb/usb-installer-test", test_image)
    for part in ("compose", "installer"):  # image.yaml's paths stay inside its folder
        shutil.copytree(root / "images/usb-installer" / part, test_image / part)
    sources = root / "build/sources/usb-test-live"
    shutil.copytree(usb_live, sources)
    stamp = hashlib.sha256(LIVE_SCRIPT.read_bytes()).hexdigest()
    (sources / ".prepare-stamp").write_text(stamp + "\n")
    payload = root / "mirror/builds/smoke/v1/smoke.raw"
    payload.parent.mkdir(parents=True)
    payload.write_bytes(payload_bytes())
    (tmp_path / "site.yaml").write_text(SITE)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "usb-installer-test")
    proc = build_py(root, "release", "set", RELEASE, "smoke", "--commit", "HEAD", "--version",
                    "v1", "--file", "smoke.raw")
    assert proc.returncode == 0, proc.stderr
    git(root, "commit", "-qam", f"release {RELEASE}")
    return root


def build(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """./build.py with the test's site file and a payload cache of the test's own."""
    return build_py(repo, *args, "--site", str(repo.parent / "site.yaml"),
                    env={"XDG_CACHE_HOME": str(repo.parent / "cache")})


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error:"))


# --- no release, no build ----------------------------------------------------------------------


def test_build_refuses_without_a_recorded_release(usb_repo: Path) -> None:
    proc = build(usb_repo, "usb-installer")
    assert proc.returncode == 2, proc.stderr
    assert "embeds the rocky8-base disk of a release: build it with --release X" in \
        first_error(proc.stderr)
    proc = build(usb_repo, "usb-installer", "--release", "9.9")
    assert proc.returncode == 2, proc.stderr
    assert "no release '9.9'" in first_error(proc.stderr)
    proc = build(usb_repo, "usb-installer", "--release", RELEASE)  # it has no rocky8-base
    assert proc.returncode == 2, proc.stderr
    assert f"release '{RELEASE}' has no image 'rocky8-base'" in first_error(proc.stderr)
    assert "==>" not in proc.stderr
    assert not (usb_repo / "build" / "usb-installer").exists()


def test_render_without_a_release_uploads_a_stand_in(usb_repo: Path) -> None:
    proc = build(usb_repo, "render", "usb-installer")
    assert proc.returncode == 0, proc.stderr
    hcl = usb_repo / proc.stdout.strip()
    text = hcl.read_text()
    assert "alpine-standard-3.18.3-x86_64.iso" in text
    assert 'destination = "/mnt/osimage-payload/payload-stand-in.raw"' in text
    # the upload comes right after the partitioning, before the installer and the boot media
    assert text.index("# partition") < text.index("# payload-upload") < text.index("# installer")
    # environments go to the VM as files Packer uploads (osimage/build/render.py)
    envs = "".join(f.read_text() for f in (hcl.parent / "provision").glob("*.env"))
    assert "export OSIMAGE_PAYLOAD_SHA256=" in envs
    live_ssh = (hcl.parent / "http" / "live-ssh.sh").read_text()
    assert "ssh-ed25519 " in live_ssh and "PRIVATE" not in live_ssh
    assert "no --release" in proc.stderr


def test_damaged_payload_is_refused_before_packer(usb_repo: Path) -> None:
    payload = usb_repo / "mirror/builds/smoke/v1/smoke.raw"
    data = bytearray(payload.read_bytes())
    data[1000] ^= 0xFF
    payload.write_bytes(bytes(data))  # same size, other bytes
    proc = build(usb_repo, "usb-installer-test", "--release", RELEASE)
    assert proc.returncode == 1, proc.stderr
    assert "the release says" in first_error(proc.stderr)
    assert "refused" in first_error(proc.stderr)
    assert "==> packer build" not in proc.stderr
    assert not (usb_repo / "images/usb-installer-test/manifest.json").exists()


# --- end to end ----------------------------------------------------------------------------


def boot_stick(stick: Path, target: Path, log: Path, uefi: bool, timeout: float = 90) -> str:
    """Boot the stick under qemu (TCG) with target as its second disk; the stick's system runs
    the installer and powers off. Returns the serial console's output."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
            "-nic", "none", "-serial", f"file:{log}", "-monitor", "none"]
    if uefi:
        vars_copy = log.with_suffix(".vars.fd")
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,file={vars_copy}"]
    argv += ["-drive", f"file={stick},format=raw,if=virtio,snapshot=on",
             "-drive", f"file={target},format=raw,if=virtio"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"the stick did not power off within {timeout} s:\n"
                    + log.read_text(errors="replace")[-3000:])
    return log.read_text(errors="replace")


@pytest.mark.vm
def test_stick_installs_the_release_payload(usb_repo: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = build(usb_repo, "usb-installer-test", "--release", RELEASE)
    assert proc.returncode == 0, proc.stderr
    built_in = time.monotonic() - t0
    assert not qemu_pids(usb_repo), "the build left its VM running"
    want = hashlib.sha256(payload_bytes()).hexdigest()
    for step in ("resolve payload", "fetch payload", "packer build", "publish to mirror"):
        assert f"ok {step} (" in proc.stderr
    assert f"smoke.raw: size and sha256 match release {RELEASE}" in proc.stderr
    stick = usb_repo / "mirror/builds/usb-installer-test" / RELEASE / "usb-installer-test.raw"
    assert stick.is_file()

    # the build's record says what it embeds
    data = json.loads((usb_repo / "images/usb-installer-test/manifest.json").read_text())
    custom = data["builds"][-1]["custom_data"]
    assert custom["payload"] == {"image": "smoke", "release": RELEASE, "version": "v1",
                                 "file": "smoke.raw", "sha256": want}

    # the layout: MBR, p1 FAT32 active (syslinux, EFI loader), p2 ext4 with the payload
    table = json.loads(subprocess.run(["sfdisk", "--json", str(stick)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    p1, p2 = table["partitions"]
    assert table["label"] == "dos" and p1["type"] == "c" and p1.get("bootable")
    assert p2["type"] == "83"
    offset = p2["start"] * 512
    env = subprocess.run(["debugfs", "-R", "cat /payload.env", f"{stick}?offset={offset}"],
                         check=True, capture_output=True, text=True).stdout
    assert f"PAYLOAD_SHA256='{want}'" in env and "PAYLOAD_FORMAT='raw'" in env
    assert f"PAYLOAD_RELEASE='{RELEASE}'" in env
    mdir = subprocess.run(["mdir", "-b", "-i", f"{stick}@@{p1['start'] * 512}", "::/efi/boot"],
                          capture_output=True, text=True, env={**os.environ,
                                                               "MTOOLS_SKIP_CHECK": "1"})
    assert "BOOTX64.EFI" in mdir.stdout.upper()

    # write-usb puts it on a (stand-in) stick, then the stick boots by BIOS and installs
    sysroot = tmp_path / "sysroot"
    block = sysroot / "sys/class/block/sdz"
    block.mkdir(parents=True)
    (block / "removable").write_text("1\n")
    (block / "size").write_text(f"{(256 << 20) // 512}\n")
    (sysroot / "proc/self").mkdir(parents=True)
    (sysroot / "proc/self/mounts").write_text("")
    device = tmp_path / "dev" / "sdz"
    device.parent.mkdir()
    with device.open("wb") as f:
        f.truncate(256 << 20)
    proc = build_py(usb_repo, "write-usb", "usb-installer-test", str(device), "--yes",
                    env={"OSIMAGE_WRITE_USB_SYSROOT": str(sysroot)})
    assert proc.returncode == 0, proc.stderr
    assert "written and read back" in proc.stdout and "(as recorded)" in proc.stdout

    t1 = time.monotonic()
    target = tmp_path / "node-disk.raw"
    with target.open("wb") as f:
        f.truncate(64 << 20)
    console = boot_stick(device, target, tmp_path / "bios.log", uefi=False)
    bios_s = time.monotonic() - t1
    assert "osimage.boot=bios" in console
    assert f"osimage-install: verified: /dev/vdb holds smoke v1 (release {RELEASE}) " \
           f"(sha256 {want})" in console, console[-3000:]
    assert "usb-test: osimage-install exit status 0" in console
    assert hashlib.sha256(target.read_bytes()[:PAYLOAD_SIZE]).hexdigest() == want

    # ... and by UEFI (OVMF), from the built artifact itself
    if not OVMF_CODE.exists():
        pytest.skip("no OVMF firmware (apt-get install ovmf): UEFI boot not tested")
    t2 = time.monotonic()
    with target.open("wb") as f:
        f.truncate(0)
        f.truncate(64 << 20)
    console = boot_stick(stick, target, tmp_path / "uefi.log", uefi=True, timeout=150)
    uefi_s = time.monotonic() - t2
    assert "osimage.boot=uefi" in console, console[-3000:]
    assert f"osimage-install: verified: /dev/vdb holds smoke v1 (release {RELEASE})" in console
    assert hashlib.sha256(target.read_bytes()[:PAYLOAD_SIZE]).hexdigest() == want
    print(f"build {built_in:.1f} s, BIOS install {bios_s:.1f} s, UEFI install {uefi_s:.1f} s")


# --- the installer on its own (qcow2 payloads, refusals) -----------------------------------------


def stick_folder(tmp_path: Path, payload: Path) -> Path:
    """The stick's payload partition as compose.sh leaves it, for a payload file."""
    folder = tmp_path / "stick"
    folder.mkdir()
    shutil.copy(INSTALLER, folder / "osimage-install")
    shutil.copy(payload, folder / payload.name)
    data = payload.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    qcow2 = data[:3] == b"QFI"
    vsize = int.from_bytes(data[24:32], "big") if qcow2 else len(data)
    (folder / f"{payload.name}.sha256").write_text(f"{digest}  {payload.name}\n")
    (folder / "payload.env").write_text(
        f"PAYLOAD_FILE='{payload.name}'\nPAYLOAD_SHA256='{digest}'\nPAYLOAD_SIZE='{len(data)}'\n"
        f"PAYLOAD_FORMAT='{'qcow2' if qcow2 else 'raw'}'\nPAYLOAD_VIRTUAL_SIZE='{vsize}'\n"
        "PAYLOAD_IMAGE='smoke'\nPAYLOAD_VERSION='v1'\nPAYLOAD_RELEASE='1.0'\n")
    return folder


def install(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(folder / "osimage-install"), *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120,
                          env={**os.environ, "OSIMAGE_INSTALL_ALLOW_FILE": "1"})


def test_installer_writes_and_verifies_a_qcow2_payload(tmp_path: Path,
                                                        smoke_sources: Path) -> None:
    """rocky8-base is a qcow2: written as raw with qemu-img, compared back with qemu-img."""
    folder = stick_folder(tmp_path, smoke_sources / "smoke.qcow2")
    target = tmp_path / "disk.raw"
    target.write_bytes(random.Random(1).randbytes(1 << 20))  # old data at the start
    with target.open("r+b") as f:
        f.truncate(200 << 20)  # larger than the image: the rest is not compared
    proc = install(folder, "--target", str(target), "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified:" in proc.stdout and "qemu-img compare" in proc.stdout
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                           str(smoke_sources / "smoke.qcow2"), str(target)],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout


def test_installer_refusals(tmp_path: Path) -> None:
    payload = tmp_path / "node.raw"
    payload.write_bytes(random.Random(3).randbytes(1 << 20))
    folder = stick_folder(tmp_path, payload)
    small = tmp_path / "small.raw"
    small.write_bytes(b"\0" * 4096)
    target = tmp_path / "disk.raw"
    target.write_bytes(b"\0" * (2 << 20))

    proc = install(folder, "--target", str(target))  # no terminal to confirm on
    assert proc.returncode == 2 and "not confirmed" in proc.stderr
    proc = install(folder, "--target", str(small), "--yes")
    assert proc.returncode == 2 and "needs 1.0 MiB" in proc.stderr
    proc = install(folder, "--yes")
    assert proc.returncode == 2 and "no target disk" in proc.stderr
    proc = subprocess.run(["sh", str(folder / "osimage-install"), "--target", str(target),
                           "--yes"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "is not a disk" in proc.stderr  # a file, without the hook
    assert target.read_bytes() == b"\0" * (2 << 20)

    damaged = bytearray(payload.read_bytes())
    damaged[5] ^= 1
    (folder / payload.name).write_bytes(bytes(damaged))
    proc = install(folder, "--check")
    assert proc.returncode == 1 and "the stick is damaged" in proc.stderr
    proc = install(folder, "--target", str(target), "--yes")
    assert proc.returncode == 1
    assert target.read_bytes() == b"\0" * (2 << 20)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_stick_scripts_pass_shellcheck(tmp_path: Path) -> None:
    """The scripts without .sh (tests/test_smoke_disk.py checks images/**/*.sh)."""
    live_ssh = tmp_path / "live-ssh.sh"
    live_ssh.write_text((PROJECT / "images/usb-installer/http/live-ssh.sh.j2").read_text()
                        .replace("{{ ssh_public_key }}", "ssh-ed25519 AAAA test")
                        .replace("{{ image }}", "usb-installer")
                        .replace("{{ version }}", "1.0"))
    proc = subprocess.run(["shellcheck", "-S", "warning", str(INSTALLER), str(live_ssh),
                           str(LIVE_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_libvirt_render_uploads_the_payload_and_reads_live_ssh_from_the_cd(
        usb_repo: Path, tmp_path: Path) -> None:
    from osimage.build import hclschema

    site = tmp_path / "libvirt-site.yaml"
    site.write_text("backend: libvirt\nlibvirt:\n  uri: qemu+ssh://root@kvm01.example/system\n"
                    "  pool: images\n  network: builds\n  driver: plugin\n")
    proc = build_py(usb_repo, "render", "usb-installer", "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    hcl = usb_repo / proc.stdout.strip()
    text = hcl.read_text()
    src = hclschema.check_text(text, str(hcl))["source"][0]["libvirt"]["usb-installer"]
    oemdrv = next(v for v in src["volume"] if v.get("alias") == "oemdrv")["source"][0]
    assert oemdrv["files"] == [str(hcl.parent / "http" / "live-ssh.sh")]
    fetch = src["boot_command"][2]
    assert "hd:LABEL=OEMDRV:/live-ssh.sh ||" in fetch and "findfs LABEL=OEMDRV" in fetch
    assert 'destination = "/mnt/osimage-payload/payload-stand-in.raw"' in text
