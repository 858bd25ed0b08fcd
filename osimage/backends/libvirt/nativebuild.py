"""The build's steps for `backend: libvirt` with `libvirt.driver: native`, the default.

osimage runs the build's VM through libvirt itself (native.py) and Packer only provisions it,
as a `null` source with the SSH communicator (templates/libvirt-native.pkr.hcl.j2): no plugin,
no `packer init`, Packer 1.6.6 is enough, and every provisioner works as with qemu.

    connect to hypervisor    before rendering, only where Packer runs
    upload source to pool    the source disk, unless it is there already (steps.step_upload)
    render and validate HCL  checked with packer validate and python-hcl2, the address unknown
    boot build domain        the build's record for ./build.py clean, then a qcow2 overlay
                             on the source volume and a tagged domain; its address from the
                             site's address_source; the HCL rendered again with it (and the
                             hypervisor as SSH bastion when it is qemu+ssh:// on NAT)
    packer build             the image's provisioners, then its shutdown_command
    download build disk      the guest stopped (shutdown_command, ACPI, destroy), the overlay
                             downloaded through a stream and flattened into a standalone qcow2

The domain, the overlay and the record are removed when the build ends, however it ends
(--keep-failed keeps them after a failure). An ISO source (installer or live system) boots through
install.py instead of an overlay.
"""

from __future__ import annotations

import contextlib
import shlex
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType
from typing import Any

from osimage import runner
from osimage.backends.libvirt import clean as libvirt_clean
from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt import install, native
from osimage.backends.libvirt import steps as plugin_steps
from osimage.backends.libvirt import streams as libvirt_streams
from osimage.build import packer, render
from osimage.build import steps as core
from osimage.build.context import BuildContext
from osimage.build.feature import Step
from osimage.config import display_path
from osimage.errors import BuildError, ConfigError
from osimage.publish import artifacts
from osimage.sizes import human, parse_size

TEMPLATE = "libvirt-native.pkr.hcl.j2"
UNKNOWN_HOST = "0.0.0.0"  # noqa: S104 - a placeholder the rendered check needs, never dialled
SHUTDOWN_WAIT = 120.0  # seconds the guest has to stop after its shutdown_command
ACPI_WAIT = 60.0  # then after the power button, before it is destroyed
ADDRESS_WAIT = 300.0  # seconds for the guest's address (site: libvirt.address_timeout)


def _state(ctx: BuildContext) -> plugin_steps.LibvirtBuild:
    return plugin_steps.state(ctx)


def step_connect(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    build = _state(ctx)
    s = build.settings
    if s.bridge:
        raise ConfigError(f"{s.shown}: libvirt.bridge: driver native needs a managed network "
                          f"for now (libvirt.network)")
    install.check_source(ctx)
    lv.ssh_bastion(s.uri, f"{s.shown}: libvirt.uri")  # a URI without a key fails here, exit 2
    libvirt = lv.libvirt_module()
    try:
        build.conn = lv.connect(s.uri)
    except (libvirt.libvirtError, TimeoutError) as e:
        raise BuildError(f"cannot connect to {s.uri}: {lv.error_text(e)}",
                         hint=lv.connect_hint(s.uri)) from None
    stack.callback(_close, build.conn)
    ctx.reporter.info(f"    {s.uri}: pool {s.pool}, network {s.network or s.bridge}")


def _close(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _shutdown_provisioner(ctx: BuildContext) -> dict[str, Any]:
    """The image's shutdown_command as the last provisioner: started in the background a
    moment later, so Packer's shell provisioner ends (and removes its script) before sshd
    goes away; the download step then waits for the guest to stop."""
    command = ctx.image.data.get("shutdown_command", "shutdown -P now")
    script = ctx.work_dir / "provision" / "zz-shutdown.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n( trap '' HUP; sleep 1; "
                      f"sh -c {shlex.quote(command)} ) </dev/null >/dev/null 2>&1 &\n")
    return {"name": "shutdown_command", "type": "shell", "script": str(script),
            "execute_command": "chmod +x {{.Path}}; {{.Path}}"}


def _variables(ctx: BuildContext, ssh_host: str,
               bastion: lv.SSHBastion | None = None) -> dict[str, Any]:
    build = _state(ctx)
    base = core.template_variables(ctx)
    return {**base, "builder_source": "null", "ssh_host": ssh_host,
            "domain_name": build.domain, "bastion": bastion,
            "provisioners": [*base["provisioners"], _shutdown_provisioner(ctx)]}


def _write_hcl(ctx: BuildContext, ssh_host: str,
               bastion: lv.SSHBastion | None = None) -> tuple[Path, str]:
    text = render.render(ctx.root / "templates", TEMPLATE, _variables(ctx, ssh_host, bastion))
    hcl = ctx.work_dir / f"{ctx.image.name}.pkr.hcl"
    return hcl, text


def step_render(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    build = _state(ctx)
    ctx.accelerator = "kvm" if build.settings.domain_type == "kvm" else "tcg"
    hcl, text = _write_hcl(ctx, UNKNOWN_HOST)
    core.fresh_output(ctx, hcl, text)
    shown = display_path(hcl, ctx.root)
    parsed = (ctx.hcl_checker.parse(text, shown) if ctx.hcl_checker is not None
              else render.parse_hcl(text, shown))
    if not render.sources_of(parsed):
        raise BuildError(f"{hcl}: the rendered HCL has no source block")
    packer.validate(ctx.site.packer_binary, hcl, ctx.work_dir)
    if install.is_iso(ctx):  # an installer or live ISO: how virt-install will boot it
        install.write_command(ctx)
    ctx.inputs_sha256 = core.inputs_hash(ctx)
    ctx.reporter.info(f"    rendered {shown} (a null source; the guest's address is filled in "
                      f"once it has one)")


def _site_number(ctx: BuildContext, key: str, default: float) -> float:
    return float((ctx.site.data.get("libvirt") or {}).get(key, default))


def _bastion(ctx: BuildContext, build: plugin_steps.LibvirtBuild) -> lv.SSHBastion | None:
    """The hypervisor as SSH bastion when the guest is not routable from here: a qemu+ssh://
    hypervisor whose network is NAT or isolated. Packer 1.6.6 does not check a bastion's host
    key, so it is checked here first, by OpenSSH with the rules libvirt's ssh used."""
    bastion = lv.ssh_bastion(build.settings.uri, f"{build.settings.shown}: libvirt.uri")
    if bastion is None:
        return None
    net = build.conn.networkLookupByName(build.settings.network or "default")
    forward = ET.fromstring(net.XMLDesc(0)).find("forward")  # noqa: S314 - libvirt's own XML
    if forward is not None and forward.get("mode", "nat") != "nat":
        return None  # routed, open or a host bridge: the guest is reached directly
    result = runner.run([*bastion.ssh_argv(), bastion.destination, "true"], check=False,
                        what="ssh to the hypervisor")
    if not result.ok:
        why = next((t for t in reversed(result.tail) if t.strip()), f"exit {result.returncode}")
        raise BuildError(f"{bastion.destination} port {bastion.port}: cannot log in to the "
                         f"hypervisor to reach the guest through it: {why}",
                         hint="the guest's network is NAT: Packer reaches it through the "
                              "hypervisor's sshd, which must know the URI's key; its host "
                              "key must be in known_hosts (or the URI says no_verify=1)")
    return bastion


def _login(ctx: BuildContext, addr: str, bastion: lv.SSHBastion | None) -> list[str]:
    """The command a person logs in to the guest with (--debug): the build's key, the guest's
    address, through the hypervisor when it is the bastion."""
    user = ctx.image.data.get("ssh", {}).get("username", "root")
    argv = ["ssh", "-i", str(ctx.key_file), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null"]
    if bastion is not None:
        jump = shlex.join([*bastion.ssh_argv(), "-W", "%h:%p", bastion.destination])
        argv += ["-o", f"ProxyCommand={jump}"]
    return [*argv, f"{user}@{addr}"]


def step_boot(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The build's record, then the overlay and the tagged domain, booted; the HCL rendered
    again with its address. Each phase says so on a line of its own."""
    build = _state(ctx)
    if install.is_iso(ctx):  # an installer or live ISO (install.py)
        _reached(ctx, build, install.boot(ctx, stack))
        return
    s = build.settings
    assert build.source is not None and ctx.key_file is not None
    source = lv.lookup_volume(build.conn, s.pool, build.source.name)
    disk = f"{build.domain}-disk.qcow2"
    spec = native.DomainSpec(
        name=build.domain, run=ctx.run_uuid, image=ctx.image.name, pool=s.pool,
        network=s.network or "default", disk=disk, volumes=(disk,),
        memory_mib=int(ctx.image.data["memory"]), cpus=int(ctx.image.data["cpus"]),
        accelerator=ctx.accelerator,
        authorized_key=Path(f"{ctx.key_file}.pub").read_text())
    vm = native.BuildDomain(build.conn, spec, source,
                            capacity=parse_size(ctx.image.data["disk_size"]),
                            on_defined=lambda: ctx.reporter.info(
                                f"    domain {spec.name} defined"))

    def keep_if_failed(et: type[BaseException] | None, e: BaseException | None,
                       tb: TracebackType | None) -> bool:
        vm.keep = et is not None and ctx.keep_failed
        return False

    def drop_record() -> None:
        if not vm.keep:
            with contextlib.suppress(Exception):
                lv.delete_volume(build.conn, s.pool, spec.tag.record_name)

    # The record before anything is defined: a build killed from here on is found by
    # `./build.py clean` (clean.py), and the domain carries the same tag.
    libvirt_clean.write_record(build.conn, spec.tag)
    build.tag = spec.tag
    stack.callback(drop_record)
    ctx.reporter.info(f"    {s.pool}/{spec.tag.record_name}: the build's record for "
                      f"./build.py clean")
    stack.enter_context(vm)
    stack.push(keep_if_failed)  # runs before the removal: --keep-failed keeps them
    ctx.state["native_vm"] = vm
    timeout = _site_number(ctx, "address_timeout", ADDRESS_WAIT)
    ctx.reporter.info(f"    domain {spec.name} ({s.pool}/{disk} over {build.source.name}) "
                      f"started in {sum(vm.timings.values()):.1f} s; waiting for its address "
                      f"from {s.address_source} (at most {timeout:.0f} s)")
    _reached(ctx, build, native.wait_for_address(vm.dom, s.address_source, timeout=timeout))


def _reached(ctx: BuildContext, build: plugin_steps.LibvirtBuild, addr: str) -> None:
    """The guest has its address: the HCL rendered again with it, the --debug login line."""
    s = build.settings
    bastion = _bastion(ctx, build)
    hcl, text = _write_hcl(ctx, addr, bastion)
    hcl.write_text(text)
    ctx.guest_login = _login(ctx, addr, bastion)
    through = f", through {bastion.destination} port {bastion.port}" if bastion else ""
    ctx.reporter.info(f"    guest address {addr} (from {s.address_source}{through})")


def step_download(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The guest stopped, its overlay downloaded and flattened into a standalone qcow2 with
    the local copy of the source as backing (the same bytes as the pool's, checked by sha256
    at upload), hashed."""
    build = _state(ctx)
    vm: native.BuildDomain = ctx.state["native_vm"]
    t0 = time.monotonic()
    if native.wait_shut_off(vm.dom, SHUTDOWN_WAIT):
        how = "its shutdown_command"
    else:
        how = {"acpi": "the ACPI power button", "destroyed": "destroy"}.get(
            native.shutdown(vm.dom, ACPI_WAIT), "itself")
    ctx.reporter.info(f"    domain {vm.spec.name} stopped by {how} "
                      f"({time.monotonic() - t0:.1f} s)")
    if install.is_iso(ctx):  # the target volume is the disk (install.py)
        install.step_download(ctx, stack)
        return
    disk = ctx.image.data["outputs"]["disk"]
    fmt = disk.get("format", "qcow2")
    compress = disk.get("compression", "none") == "zstd" and fmt == "qcow2"
    src = plugin_steps.source_of(ctx)
    if "://" in src.location:
        raise BuildError(f"{src.location}: driver native flattens the build's disk with a "
                         f"local copy of its source; give the site a local one (sources:)")
    final = ctx.output_dir / f"{ctx.image.name}.{fmt}"
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".overlay-", dir=ctx.work_dir) as tmp:
        overlay = Path(tmp) / "overlay.qcow2"
        ctx.reporter.info(f"    downloading {build.settings.pool}/{vm.spec.disk} "
                          f"({human(lv.volume_physical_size(vm.overlay))})")
        got = libvirt_streams.download_stream(build.conn, vm.overlay, overlay,
                                              progress=ctx.reporter.info,
                                              what=f"download {vm.spec.disk}")
        ctx.reporter.info(f"    {build.settings.pool}/{vm.spec.disk}: {human(got.size)} in "
                          f"{got.seconds:.1f} s ({human(got.rate)}/s)")
        # The overlay names its backing by the hypervisor's path: point it at the local copy.
        runner.run(["qemu-img", "rebase", "-u", "-b", str(Path(src.location).resolve()),
                    "-F", src.format, str(overlay)], what="qemu-img rebase")
        argv = ["qemu-img", "convert", "-f", "qcow2", "-O", fmt]
        if compress:
            argv += ["-c", "-o", "compression_type=zstd"]
        runner.run([*argv, str(overlay), str(final)], what="qemu-img convert")
    art = artifacts.record(final)
    ctx.artifacts = [art]
    ctx.builder_type = "libvirt-native"
    ctx.artifact_id = f"{build.settings.pool}/{vm.spec.disk}"
    ctx.reporter.info(f"    {art.name}: {human(art.size)}, sha256 {art.sha256} (standalone "
                      f"{fmt}{', zstd-compressed' if compress else ''})")


class LibvirtNative:
    name = "libvirt"
    steps = (
        Step("connect to hypervisor", step_connect, at="before render", needs_vm=True),
        Step("upload source to pool", plugin_steps.step_upload, at="before render",
             needs_vm=True),
        Step("render and validate HCL", step_render, slot="render"),
        Step("boot build domain", step_boot, at="before packer"),
        Step("download build disk", step_download, slot="artifacts"),
    )
    artifact_in_output_dir = False  # the disk is a pool volume until downloaded


BACKEND = LibvirtNative()
