"""Installer sources (`source.iso`) for the native libvirt driver (issue 15).

Two kinds of ISO, told apart by the image's boot_command (no new image key):

- an installer that carries its own kernel and initrd (Anaconda's DVD, rocky8-base; any ISO
  with a .treeinfo): its boot_command hands the installer its configuration as a kernel
  argument from Packer's HTTP server (`inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg`,
  `ks=`, or d-i's `preseed/url=`). Here there is no HTTP server: `virt-install --location ISO
  --initrd-inject FILE` puts the rendered file into the installer's initrd, and the argument
  becomes `inst.ks=file:/ks.cfg` (d-i: `preseed/file=/NAME`). The rest of the typed command
  line (inst.text, console=...) is the kernel's command line; the keys are not typed.
  The install runs with `on_reboot` destroy; once it has stopped the domain, the domain is
  defined again to boot its disk, and Packer provisions the installed system.
- a live ISO driven by typed keys (usb-installer's Alpine): the ISO as a CD, beside an OEMDRV
  CD with the image's http_directory (the URLs of the boot_command point there, as with the
  plugin), and the boot_command typed through virDomainSendKey after boot_wait.

`virt-install --print-xml` makes the domain's XML (kept in the build folder as
virt-install.xml, its command line as virt-install.cmd, written already by `./build.py render`).
virt-install removes the kernel and initrd it prepared when it only prints, and they would be
on the build machine, not the hypervisor: osimage extracts them from the ISO as the .treeinfo
names them, appends the file to the initrd as virt-install's --initrd-inject does (a newc cpio,
gzip), and uploads both as volumes of the build. The XML then gets osimage's tag, the build's
key by fw_cfg, the pool's volumes instead of the build machine's paths, and is defined through
libvirt. Every volume and the domain are removed when the build ends, however it ends.
"""

from __future__ import annotations

import configparser
import contextlib
import re
import shlex
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from osimage import runner
from osimage.backends.libvirt import clean as libvirt_clean
from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt import native
from osimage.backends.libvirt import steps as plugin_steps
from osimage.backends.libvirt import streams as libvirt_streams
from osimage.build import steps as core
from osimage.build.context import BuildContext
from osimage.errors import BuildError, ConfigError
from osimage.runner import check_interrupted
from osimage.sizes import parse_size

COMMAND_FILE = "virt-install.cmd"
XML_FILE = "virt-install.xml"
# The installer's configuration as a kernel argument with a URL of Packer's HTTP server, and
# what it becomes once the file is in the initrd (Anaconda reads file:, d-i its own path).
_CONFIG_ARG = re.compile(r"(?P<key>inst\.ks|ks|preseed/url|url)="
                         r"https?://\{\{\s*\.HTTPIP\s*\}\}:\{\{\s*\.HTTPPort\s*\}\}/(?P<path>\S+)")
_INJECTED = {"inst.ks": "inst.ks=file:/{name}", "ks": "ks=file:/{name}",
             "preseed/url": "preseed/file=/{name}", "url": "preseed/file=/{name}"}
_KEY = re.compile(r"<[^<>\s]+>")  # Packer's <tab>, <enter>, <wait5>, ...


@dataclass(frozen=True)
class Plan:
    """How an ISO source is booted."""

    kind: str  # "location" (the ISO's kernel and initrd) or "live" (CD + typed keys)
    inject: Path | None = None  # the rendered file put into the initrd
    kernel_args: str = ""
    boot_command: tuple[str, ...] = ()


def is_iso(ctx: BuildContext) -> bool:
    return plugin_steps.source_of(ctx).kind == "iso"


def _http_dir(ctx: BuildContext) -> Path | None:
    folder = core.served_http_directory(ctx)
    return Path(folder) if folder else None


def plan(ctx: BuildContext) -> Plan:
    shown = f"images/{ctx.image.name}/image.yaml"
    commands = list(ctx.image.data.get("boot_command", []))
    for i, line in enumerate(commands):
        m = _CONFIG_ARG.search(line)
        if m is None:
            continue
        if len(commands) > 1:
            raise ConfigError(f"{shown}: boot_command[{i}]: an installer booted from its own "
                              f"kernel (virt-install --location) takes one command line; "
                              f"this boot_command has {len(commands)} entries")
        name = Path(m["path"]).name
        http = _http_dir(ctx)
        inject = http / m["path"] if http is not None else None
        if inject is None or not inject.is_file():
            raise ConfigError(f"{shown}: boot_command[0]: {m['key']}= names {m['path']}, "
                              f"which is not in the image's http_directory")
        args = line[:m.start()] + _INJECTED[m["key"]].format(name=name) + line[m.end():]
        if ".HTTPIP" in args or ".HTTPPort" in args:
            raise ConfigError(f"{shown}: boot_command[0]: driver native has no HTTP server; "
                              f"only the installer's configuration (inst.ks=, ks=, "
                              f"preseed/url=) may come from it")
        return Plan("location", inject=inject, kernel_args=" ".join(_KEY.sub(" ", args).split()))
    return Plan("live", boot_command=tuple(plugin_steps.boot_command_for_libvirt(commands,
                                                                                 shown)))


# --- names and the virt-install command ------------------------------------------------------


@dataclass(frozen=True)
class Volumes:
    """The build's volumes in the pool (besides the shared, kept source volume)."""

    target: str
    oemdrv: str | None = None
    kernel: str | None = None
    initrd: str | None = None

    @property
    def all(self) -> tuple[str, ...]:
        return tuple(v for v in (self.target, self.oemdrv, self.kernel, self.initrd) if v)


def volumes(ctx: BuildContext, p: Plan) -> Volumes:
    build = plugin_steps.state(ctx)
    d = build.domain
    target = plugin_steps.artifact_volume(ctx, build)  # what plugin_steps.step_download reads
    if p.kind == "location":
        return Volumes(target, kernel=f"{d}-kernel", initrd=f"{d}-initrd")
    return Volumes(target, oemdrv=plugin_steps.oemdrv_volume(build) if _http_dir(ctx) else None)


def _local_iso(ctx: BuildContext) -> Path:
    src = plugin_steps.source_of(ctx)
    if "://" in src.location:
        raise ConfigError(f"images/{ctx.image.name}/image.yaml: source.iso: driver native "
                          f"reads the installer's kernel from a local copy of the ISO: give "
                          f"the site one (sources: {ctx.image.name}: iso: PATH)")
    return Path(src.location).resolve()


def check_source(ctx: BuildContext) -> None:
    """Before anything is uploaded: an installer's ISO must be on this machine."""
    if is_iso(ctx) and plan(ctx).kind == "location":
        _local_iso(ctx)


def virt_install_argv(ctx: BuildContext, p: Plan, vols: Volumes) -> list[str]:
    """virt-install printing the domain's XML (its first boot: the install)."""
    build = plugin_steps.state(ctx)
    s = build.settings
    data = ctx.image.data
    fmt = data["outputs"]["disk"].get("format", "qcow2")
    argv = ["virt-install", "--connect", s.uri, "--print-xml", "1", "--noautoconsole",
            "--name", build.domain, "--memory", str(data["memory"]),
            "--vcpus", str(data["cpus"]), "--virt-type", s.domain_type,
            "--osinfo", "detect=on,require=off",
            "--disk", f"vol={s.pool}/{vols.target},format={fmt},bus={s.disk_bus}",
            "--network", f"network={s.network or 'default'},model=virtio",
            "--graphics", "vnc,listen=127.0.0.1", "--serial", "pty"]
    src = plugin_steps.source_of(ctx)
    if p.kind == "location":
        assert p.inject is not None
        location = src.location if "://" in src.location else str(_local_iso(ctx))
        argv += ["--location", location, "--initrd-inject", str(p.inject),
                 "--extra-args", p.kernel_args]
    else:
        argv += ["--disk", f"vol={s.pool}/{src.volume},device=cdrom,bus={s.cdrom_bus}"]
        if vols.oemdrv:
            argv += ["--disk", f"vol={s.pool}/{vols.oemdrv},device=cdrom,bus={s.cdrom_bus}"]
        argv += ["--boot", "hd,cdrom"]
    return argv


def write_command(ctx: BuildContext) -> Path:
    """The virt-install command line into the build folder (render time: no hypervisor)."""
    p = plan(ctx)
    path = ctx.work_dir / COMMAND_FILE
    path.write_text(shlex.join(virt_install_argv(ctx, p, volumes(ctx, p))) + "\n")
    return path


# --- the installer's kernel and initrd -------------------------------------------------------


def _extract(iso: Path, inside: str, dest: Path) -> None:
    runner.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", inside,
                str(dest)], what=f"extract {inside} from {iso.name}")


def boot_files(iso: Path, folder: Path) -> tuple[Path, Path]:
    """The kernel and initrd the ISO's .treeinfo names for x86_64."""
    _extract(iso, "/.treeinfo", folder / "treeinfo")
    info = configparser.ConfigParser()
    info.read(folder / "treeinfo")
    section = "images-x86_64"
    if not info.has_option(section, "kernel") or not info.has_option(section, "initrd"):
        raise BuildError(f"{iso}: its .treeinfo names no [{section}] kernel and initrd",
                         hint="driver native boots installers that carry a .treeinfo")
    kernel, initrd = folder / "kernel", folder / "initrd"
    _extract(iso, "/" + info.get(section, "kernel").lstrip("/"), kernel)
    _extract(iso, "/" + info.get(section, "initrd").lstrip("/"), initrd)
    return kernel, initrd


def inject(initrd: Path, file: Path, folder: Path) -> None:
    """Append file, at the initrd's root, as a gzip'd newc cpio (what --initrd-inject does;
    the kernel unpacks concatenated archives one after the other)."""
    stage = folder / "inject"
    stage.mkdir()
    shutil.copyfile(file, stage / file.name)
    archive = folder / "inject.cpio"
    runner.run(["cpio", "--create", "--quiet", "--format=newc", "--reproducible",
                "--owner=0:0", "-O", str(archive)], cwd=stage, stdin_data=file.name + "\n",
               what="cpio (initrd inject)")
    runner.run(["gzip", "-n", str(archive)], what="gzip (initrd inject)")
    with initrd.open("ab") as out, archive.with_name(archive.name + ".gz").open("rb") as gz:
        shutil.copyfileobj(gz, out)


def _upload(conn: Any, pool: str, name: str, path: Path) -> Any:
    size = path.stat().st_size
    vol = lv.create_volume(conn, pool, name, size, "raw")
    with path.open("rb") as f:
        libvirt_streams.upload_stream(conn, vol, f, size, what=f"upload {name}")
    return vol


# --- the domain ------------------------------------------------------------------------------


def _set_volume_source(disk: ET.Element, pool: str, volume: str) -> None:
    disk.set("type", "volume")
    for old in disk.findall("source"):
        disk.remove(old)
    src = ET.Element("source", {"pool": pool, "volume": volume})
    disk.insert(1, src)


def domain_xml(printed: str, spec: native.DomainSpec, iso_volume: str | None,
               kernel: str | None, initrd: str | None) -> str:
    """virt-install's XML with osimage's tag, the key by fw_cfg, a serial log, and the
    hypervisor's kernel, initrd and ISO volume instead of the build machine's paths."""
    root = ET.fromstring(printed)  # noqa: S314 - virt-install's output
    meta = ET.SubElement(root, "metadata")
    meta.append(ET.fromstring(spec.tag.metadata_xml(namespaced=True)))  # noqa: S314
    if spec.authorized_key:
        sysinfo = ET.SubElement(root, "sysinfo", {"type": "fwcfg"})
        entry = ET.SubElement(sysinfo, "entry", {"name": native.FW_CFG_KEY})
        entry.text = spec.authorized_key.strip()
    os_el = root.find("os")
    assert os_el is not None
    for tag, path in (("kernel", kernel), ("initrd", initrd)):
        el = os_el.find(tag)
        if el is not None and path is not None:
            el.text = path
    for disk in root.findall("devices/disk[@device='cdrom']"):
        if iso_volume is not None and disk.find("source[@file]") is not None:
            _set_volume_source(disk, spec.pool, iso_volume)  # --location's ISO, local path
    for nic in root.findall("devices/interface"):  # no PXE: a disk that boots nothing must
        ET.SubElement(nic, "rom", {"enabled": "no"})  # not get an address from iPXE
    serial = root.find("devices/serial")
    if serial is not None and spec.serial_log:
        ET.SubElement(serial, "log", {"file": spec.serial_log, "append": "on"})
    return ET.tostring(root, encoding="unicode")


def installed_xml(install_xml: str) -> str:
    """The domain once installed: its disk booted, restarted on reboot."""
    root = ET.fromstring(install_xml)  # noqa: S314 - ours
    os_el = root.find("os")
    assert os_el is not None
    for tag in ("kernel", "initrd", "cmdline"):
        for el in os_el.findall(tag):
            os_el.remove(el)
    ET.SubElement(os_el, "boot", {"dev": "hd"})
    reboot = root.find("on_reboot")
    if reboot is not None:
        reboot.text = "restart"
    return ET.tostring(root, encoding="unicode")


def _is_local(uri: str) -> bool:
    return not urlsplit(uri).hostname


@dataclass
class InstallDomain:
    """The build's volumes and domain from virt-install's XML; removed on leaving, unless
    keep is set then (--keep-failed). Same attributes as native.BuildDomain where the build's
    steps read them (dom, spec)."""

    ctx: BuildContext
    conn: Any
    spec: native.DomainSpec
    plan: Plan
    vols: Volumes
    dom: Any = None
    keep: bool = False
    xml: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> Self:
        libvirt = lv.libvirt_module()
        ctx, s = self.ctx, plugin_steps.state(self.ctx).settings
        with self._stack as stack:
            stack.callback(self._remove)
            try:
                libvirt_clean.write_record(self.conn, self.spec.tag)
                self._make_volumes(s.pool)
                argv = virt_install_argv(ctx, self.plan, self.vols)
                (ctx.work_dir / COMMAND_FILE).write_text(shlex.join(argv) + "\n")
                t0 = time.monotonic()
                printed = runner.output(argv, what="virt-install --print-xml")
                self.timings["virt-install"] = time.monotonic() - t0
                pool = self.conn.storagePoolLookupByName(s.pool)
                path = {v: pool.storageVolLookupByName(v).path()
                        for v in (self.vols.kernel, self.vols.initrd) if v}
                src = plugin_steps.source_of(ctx)
                self.xml = domain_xml(printed, self.spec, src.volume,
                                      path.get(self.vols.kernel or ""),
                                      path.get(self.vols.initrd or ""))
                (ctx.work_dir / XML_FILE).write_text(self.xml)
                check_interrupted()
                t0 = time.monotonic()
                self.dom = self.conn.defineXML(self.xml)
                self.dom.create()
                self.timings["define and start"] = time.monotonic() - t0
            except libvirt.libvirtError as e:
                raise BuildError(f"domain {self.spec.name}: {lv.error_text(e)}") from None
            self._stack = stack.pop_all()
        return self

    def _make_volumes(self, pool: str) -> None:
        ctx = self.ctx
        data = ctx.image.data
        fmt = data["outputs"]["disk"].get("format", "qcow2")
        lv.create_volume(self.conn, pool, self.vols.target, parse_size(data["disk_size"]), fmt)
        with tempfile.TemporaryDirectory(prefix=".install-", dir=ctx.work_dir) as tmp:
            folder = Path(tmp)
            if self.plan.kind == "location":
                assert self.plan.inject and self.vols.kernel and self.vols.initrd
                kernel, initrd = boot_files(_local_iso(ctx), folder)
                inject(initrd, self.plan.inject, folder)
                _upload(self.conn, pool, self.vols.kernel, kernel)
                _upload(self.conn, pool, self.vols.initrd, initrd)
            elif self.vols.oemdrv:
                http = _http_dir(ctx)
                assert http is not None
                cd = folder / "oemdrv.iso"
                runner.run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "OEMDRV",
                            "-o", str(cd), str(http)], what="xorriso (OEMDRV CD)")
                _upload(self.conn, pool, self.vols.oemdrv, cd)

    def installed(self) -> None:
        """Define the domain again to boot its disk, and start it."""
        self.xml = installed_xml(self.xml)
        self.dom = self.conn.defineXML(self.xml)
        self.dom.create()

    def _remove(self) -> None:
        if self.keep:
            return
        removed = libvirt_clean.remove_build(self.conn, self.spec.tag)
        if removed:
            self.ctx.reporter.info(f"    removed {', '.join(removed)}")

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()


def _seconds(text: str, where: str) -> float:
    [wait] = native.parse_boot_command(f"<wait{text}>", where)
    assert isinstance(wait, native.Wait)
    return wait.seconds


def boot(ctx: BuildContext, stack: contextlib.ExitStack) -> str:
    """The install or the live system, booted until the guest has an address (returned:
    nativebuild.step_boot renders the HCL again with it)."""
    build = plugin_steps.state(ctx)
    s = build.settings
    assert ctx.key_file is not None
    p = plan(ctx)
    vols = volumes(ctx, p)
    log = ctx.work_dir / "serial.log" if _is_local(s.uri) else None
    spec = native.DomainSpec(
        name=build.domain, run=ctx.run_uuid, image=ctx.image.name, pool=s.pool,
        network=s.network or "default", disk=vols.target, volumes=vols.all,
        accelerator=ctx.accelerator,
        authorized_key=Path(f"{ctx.key_file}.pub").read_text(),
        serial_log=str(log) if log else None)
    vm = InstallDomain(ctx, build.conn, spec, p, vols)

    def keep_if_failed(et: type[BaseException] | None, e: BaseException | None,
                       tb: TracebackType | None) -> bool:
        vm.keep = et is not None and ctx.keep_failed
        return False

    stack.enter_context(vm)
    stack.push(keep_if_failed)
    ctx.state["native_vm"] = vm
    where = f"images/{ctx.image.name}/image.yaml"
    # ssh.timeout covers the install and the installed system's boot, as with qemu
    ssh_timeout = _seconds(ctx.image.data.get("ssh", {}).get("timeout", "10m"), where)
    deadline = time.monotonic() + ssh_timeout
    shown = f"{XML_FILE} and {COMMAND_FILE} in {ctx.work_dir}"
    if p.kind == "location":
        ctx.reporter.info(f"    domain {spec.name} installing from {p.inject and p.inject.name} "
                          f"injected into the installer's initrd ({shown})")
        t0 = time.monotonic()
        if not native.wait_shut_off(vm.dom, ssh_timeout):
            raise BuildError(f"domain {spec.name}: the install did not end within "
                             f"{ssh_timeout:.0f} s (ssh.timeout)",
                             hint=f"see {log}" if log else "see the domain's serial console")
        ctx.reporter.info(f"    install ended in {time.monotonic() - t0:.1f} s; booting the "
                          f"installed disk")
        vm.installed()
    else:
        ctx.reporter.info(f"    domain {spec.name} booting {plugin_steps.source_of(ctx).volume}"
                          f" as a CD ({shown})")
        if p.boot_command:
            native.sleep_interruptibly(_seconds(ctx.image.data.get("boot_wait", "10s"), where))
            sent = native.send_boot_command(
                vm.dom, native.parse_boot_command(list(p.boot_command), f"{where}: boot_command"))
            ctx.reporter.info(f"    typed the boot_command ({sent} keys)")
    addr = native.wait_for_address(vm.dom, s.address_source,
                                   timeout=max(1.0, deadline - time.monotonic()))
    ctx.reporter.info(f"    guest address {addr} (from {s.address_source})")
    return addr


def step_download(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The target volume is the disk: downloaded as the plugin's artifact volume is."""
    plugin_steps.step_download(ctx, stack)
    ctx.builder_type = "libvirt-native"
