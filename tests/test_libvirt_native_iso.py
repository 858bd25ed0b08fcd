"""`libvirt.driver: native` with an installer ISO (osimage/backends/libvirt/install.py).

- rocky8-base and usb-installer render and validate for the native driver (no hypervisor):
  rocky8-base's kickstart goes into the installer's initrd by virt-install --initrd-inject and
  `inst.ks=file:/ks.cfg`, not from Packer's HTTP server; usb-installer boots its live ISO as a
  CD beside the OEMDRV CD.
- A real installer through a real libvirtd (tests/netns_libvirt.py): Debian 12's netboot
  installer (its linux and initrd.gz from the Debian package, on a small ISO with a .treeinfo,
  as Anaconda's DVD has) booted by ./build.py with a preseed injected exactly as a kickstart
  is. The preseed's early_command reports on the serial console and powers the domain off:
  the file reached the installer. (A whole d-i install under TCG takes far too long for CI.)
  The build then boots the installed disk (empty here); Ctrl-C while it waits for its address
  leaves no domain, no volume, no manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osimage.build import render
from tests.conftest import build_py, git
from tests.netns_libvirt import NetnsLibvirt, netns_libvirt  # noqa: F401 - the fixture
from tests.test_libvirt_native_build import leftovers, native_site

NATIVE_SITE = """\
backend: libvirt
libvirt:
  uri: qemu+ssh://root@kvm01.example/system
  pool: images
  network: builds
  driver: native
"""
DI_PACKAGE = "debian-installer-12-netboot-amd64"
DI_FILES = "usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64"
ISOLINUX = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
TYPED = "osimage.typed=SendKey-OK"
HTTP = "http://{{ .HTTPIP }}:{{ .HTTPPort }}"  # Packer's HTTP server, as image.yaml says it
MARKER = "osimage-preseed: the injected preseed reached the installer"
TREEINFO = """\
[general]
family = Debian
version = 12
name = Debian 12 netboot installer (osimage tests)
arch = x86_64
platforms = x86_64

[images-x86_64]
kernel = linux
initrd = initrd.gz
"""


def rendered(repo: Path, image: str, site: Path) -> tuple[Path, str]:
    proc = build_py(repo, "render", image, "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    hcl = repo / proc.stdout.strip().splitlines()[-1]
    return hcl, hcl.read_text()


def test_rocky8_kickstart_goes_into_the_initrd(repo: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(NATIVE_SITE)
    hcl, text = rendered(repo, "rocky8-base", site)
    parsed = render.parse_hcl(text, str(hcl))
    assert list(parsed["source"][0]["null"]) == ["rocky8-base"]
    assert "HTTPIP" not in text and "http_directory" not in text
    argv = shlex.split((hcl.parent / "virt-install.cmd").read_text())
    ks = hcl.parent / "http" / "ks.cfg"
    assert argv[argv.index("--initrd-inject") + 1] == str(ks)
    assert "ssh-ed25519 " in ks.read_text()  # rendered for the build: its key
    assert argv[argv.index("--extra-args") + 1] == \
        "inst.text inst.ks=file:/ks.cfg console=tty0 console=ttyS0,115200n8"
    assert argv[argv.index("--location") + 1].endswith("Rocky-8.5-x86_64-dvd1.iso")
    assert argv[argv.index("--connect") + 1] == "qemu+ssh://root@kvm01.example/system"
    assert "--print-xml" in argv
    assert not [a for a in argv if "HTTPIP" in a or "HTTPPort" in a or "ks=http" in a]


def test_usb_installer_boots_its_live_iso_as_a_cd(repo: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(NATIVE_SITE)
    hcl, text = rendered(repo, "usb-installer", site)
    parsed = render.parse_hcl(text, str(hcl))
    assert list(parsed["source"][0]["null"]) == ["usb-installer"]
    argv = shlex.split((hcl.parent / "virt-install.cmd").read_text())
    cds = [a for a in argv if "device=cdrom" in a]
    assert len(cds) == 2 and "alpine" not in cds[0]  # the source volume, by its sha256
    assert cds[0].startswith("vol=images/osimage-src-usb-installer-")
    assert cds[1].endswith("-oemdrv.iso,device=cdrom,bus=sata")
    assert "--location" not in argv and argv[argv.index("--boot") + 1] == "hd,cdrom"


def test_installer_boot_command_with_other_http_urls_is_refused(repo: Path,
                                                                tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(NATIVE_SITE)
    image = repo / "images" / "rocky8-base" / "image.yaml"
    image.write_text(image.read_text().replace(
        "console=tty0", "inst.updates=http://{{ .HTTPIP }}:{{ .HTTPPort }}/u.img"))
    proc = build_py(repo, "render", "rocky8-base", "--site", str(site))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: images/rocky8-base/image.yaml: boot_command[0]: driver native has no HTTP "
        "server; only the installer's configuration (inst.ks=, ks=, preseed/url=) may come "
        "from it")


# --- a real installer: Debian's netboot d-i --------------------------------------------------


@pytest.fixture(scope="module")
def di_iso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian 12's netboot installer on a small ISO with a .treeinfo (as virt-install's
    --location reads Anaconda's DVD)."""
    work = tmp_path_factory.mktemp("di")
    got = subprocess.run(["apt-get", "download", DI_PACKAGE], cwd=work, capture_output=True,
                         text=True, check=False)
    debs = list(work.glob(f"{DI_PACKAGE}_*.deb"))
    if got.returncode != 0 or not debs:
        pytest.skip(f"cannot download {DI_PACKAGE} from the Debian mirror: {got.stderr[-300:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")], check=True)
    tree = work / "tree"
    tree.mkdir()
    for name in ("linux", "initrd.gz"):
        shutil.copy(work / "x" / DI_FILES / name, tree / name)
    (tree / ".treeinfo").write_text(TREEINFO)
    # also bootable as a CD: isolinux waits at its prompt for a typed command line
    (tree / "isolinux").mkdir()
    for f in (ISOLINUX, LDLINUX):
        shutil.copy(f, tree / "isolinux")
    (tree / "isolinux" / "isolinux.cfg").write_text("SERIAL 0 115200\nPROMPT 1\nTIMEOUT 0\n")
    iso = work / "di.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "DI_TEST",
                    "-c", "isolinux/boot.cat", "-b", "isolinux/isolinux.bin", "-no-emul-boot",
                    "-boot-load-size", "4", "-boot-info-table", "-o", str(iso), str(tree)],
                   check=True, capture_output=True)
    shutil.rmtree(work / "x")
    return iso


def di_image(repo: Path, iso: Path, name: str = "di-test",
             boot: str = f"<wait>auto=true priority=critical preseed/url={HTTP}/preseed.cfg "
                         f"console=ttyS0,115200n8<enter>") -> None:
    folder = repo / "images" / name
    (folder / "http").mkdir(parents=True)
    local = repo / "build" / "sources" / name / "di.iso"
    local.parent.mkdir(parents=True)
    shutil.copy(iso, local)
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    (folder / "image.yaml").write_text(f"""\
description: Debian's netboot installer with an injected preseed (tests only)
source:
  iso: build/sources/{name}/di.iso
  checksum: sha256:{sha}
disk_size: 64M
memory: 768
cpus: 1
boot_wait: 15s
boot_command:
  - "{boot}"
http_directory: http
ssh:
  username: root
  timeout: 10m
provisioners:
  - name: never
    type: shell
    inline: ["echo the installed disk is empty here"]
outputs:
  disk:
    format: qcow2
""")
    (folder / "http" / "preseed.cfg").write_text(
        f'd-i preseed/early_command string echo "{MARKER}" >/dev/ttyS0; sleep 1; poweroff -f\n')
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", name)


@pytest.mark.vm
def test_preseed_injected_into_debian_installer(netns_env: NetnsLibvirt, repo: Path,
                                                di_iso: Path) -> None:
    """The install phase ends when the preseed's early_command powers d-i off; the build then
    waits for the installed (here: empty) disk to get an address, and Ctrl-C there leaves no
    domain, no volume, no manifest."""
    env = netns_env
    native_site(repo, env)
    di_image(repo, di_iso)
    t0 = time.monotonic()
    proc = start_build(env, repo, "di-test")
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if "install ended in" in line:
                break
        else:
            pytest.fail("the build ended before the install did: " + "".join(seen))
        print(f"d-i with an injected preseed, through native libvirt: {line.strip()} "
              f"({time.monotonic() - t0:.1f} s from ./build.py)")
        assert any(x.startswith("domain ") for x in leftovers(env))
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen) + err
    assert proc.returncode == 130, text
    assert "preseed.cfg injected into the installer's initrd" in text
    [work] = [p for p in (repo / "build" / "di-test").iterdir() if p.is_dir()]
    assert MARKER in (work / "serial.log").read_text(errors="replace")
    xml = (work / "virt-install.xml").read_text()
    assert "preseed/file=/preseed.cfg" in xml and "preseed/url" not in xml
    assert "Traceback" not in text
    assert leftovers(env) == []
    assert not (repo / "images" / "di-test" / "manifest.json").exists()


def start_build(env: NetnsLibvirt, repo: Path, image: str) -> subprocess.Popen[str]:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    full_env.pop("OSIMAGE_ROOT", None)
    return subprocess.Popen(env.exec_argv([sys.executable, str(repo / "build.py"), image,
                                           "--site", str(repo / "site.yaml")]),
                            cwd=repo, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.vm
def test_boot_command_typed_at_the_cd_prompt(netns_env: NetnsLibvirt, repo: Path,
                                             di_iso: Path) -> None:
    """A live CD driven by typed keys: the boot_command (no installer configuration in it)
    typed through virDomainSendKey at isolinux's prompt becomes the kernel's command line,
    which the kernel prints on the serial console; Ctrl-C then leaves nothing."""
    env = netns_env
    native_site(repo, env)
    di_image(repo, di_iso, "keys-test",
             f"/linux initrd=/initrd.gz console=ttyS0,115200n8 {TYPED}<enter>")
    t0 = time.monotonic()
    proc = start_build(env, repo, "keys-test")
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if "typed the boot_command" in line:
                break
        else:
            pytest.fail("the build ended before typing: " + "".join(seen))
        [work] = [p for p in (repo / "build" / "keys-test").iterdir() if p.is_dir()]
        log = work / "serial.log"
        deadline = time.monotonic() + 120
        typed = re.compile(rf"Command line: .*initrd=/initrd.gz console=ttyS0,115200n8 {TYPED}")
        while not typed.search(log.read_text(errors="replace")):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        print(f"boot_command typed and booted: {time.monotonic() - t0:.1f} s from ./build.py")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen) + err
    assert proc.returncode == 130, text
    assert "as a CD" in text and "Traceback" not in text
    assert leftovers(env) == []
