"""The build's steps for `backend: libvirt`: what the wrapper does around the Packer plugin.

Its steps (BACKEND.steps) join the core list (build/steps.py) at these places:

    libvirt preflight        before rendering: connect, pool, free space, network, Packer
    upload source to pool    the install ISO (or source disk), unless it is there already
    render and validate HCL  templates/libvirt.pkr.hcl.j2, checked against the plugin's fields
    tag build on hypervisor  the build's record into the pool, its tag onto the domain (the
                             selection of `./build.py clean`, osimage/backends/libvirt/clean.py)
    packer build             as for qemu; the plugin leaves the artifact as a pool volume
    download artifact volume through a stream, hashed in the same pass (replaces "hash
                             artifacts"), converted when image.yaml asks for zstd

`./build.py render` runs no Packer, so it needs no hypervisor: without the packer step in
the list, neither preflight nor upload is added. The build's domain and its volumes are
removed when the build ends, however it ends (--keep-failed keeps them after a failure).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

from osimage import runner
from osimage.backends.libvirt import clean as libvirt_clean
from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt import preflight
from osimage.backends.libvirt import streams as libvirt_streams
from osimage.backends.libvirt.preflight import Check
from osimage.build import hclschema, packer, render
from osimage.build import steps as core
from osimage.build.context import BuildContext
from osimage.build.feature import Step
from osimage.config import display_path
from osimage.errors import BuildError, ConfigError
from osimage.fsutil import waiting_lock
from osimage.netreason import reason as net_reason
from osimage.publish import artifacts
from osimage.sizes import human, parse_size

PACKER_MIN = "1.7.0"  # required_plugins and the plugin protocol (x5.0) of plugin 0.5.0
ISO_TOOLS = ("xorriso", "mkisofs", "hdiutil", "oscdimg")  # what the plugin makes CDs with
_HTTP_URL = re.compile(r"https?://\{\{\s*\.HTTPIP\s*\}\}:\{\{\s*\.HTTPPort\s*\}\}/?")
OEMDRV_URL = "hd:LABEL=OEMDRV:/"


@dataclass(frozen=True)
class Settings:
    """The site file's libvirt section with its defaults."""

    uri: str
    pool: str
    network: str | None
    bridge: str | None
    domain_type: str
    address_source: str
    plugin_version: str
    packer_min_version: str
    disk_bus: str
    cdrom_bus: str
    shown: str  # the site file, as error messages name it

    @classmethod
    def from_site(cls, ctx_site: Any, root: Path) -> Settings:
        shown = display_path(ctx_site.path, root) if ctx_site.path else "site.yaml"
        data = ctx_site.data.get("libvirt")
        if not isinstance(data, dict):
            raise ConfigError(f"{shown}: libvirt: missing required key 'libvirt' (backend "
                              f"libvirt needs libvirt.uri and libvirt.pool)")
        bridge = data.get("bridge")
        return cls(
            uri=data["uri"], pool=data["pool"],
            network=None if bridge else data.get("network", "default"), bridge=bridge,
            domain_type=data.get("domain_type", "kvm"),
            address_source=data.get("address_source", "arp" if bridge else "lease"),
            plugin_version=data.get("plugin_version", hclschema.plugin_info()["version"]),
            packer_min_version=data.get("packer_min_version", PACKER_MIN),
            disk_bus=data.get("disk_bus", "virtio"), cdrom_bus=data.get("cdrom_bus", "sata"),
            shown=shown)


@dataclass
class LibvirtBuild:
    """What the libvirt steps share during one build."""

    settings: Settings
    domain: str
    conn: Any = None
    source: libvirt_streams.SourceVolume | None = None
    checks: list[Check] = field(default_factory=list)
    tag: libvirt_clean.BuildTag | None = None  # set once its record is in the pool


def domain_name(ctx: BuildContext) -> str:
    """The build's domain, packer-osimage-IMAGE-RUN; its volumes are named DOMAIN-ALIAS."""
    return f"{lv.LEFTOVER_PREFIX}osimage-{ctx.image.name}-{ctx.run_uuid[:8]}"


def oemdrv_volume(build: LibvirtBuild) -> str:
    return f"{build.domain}-oemdrv.iso"


def artifact_volume(ctx: BuildContext, build: LibvirtBuild) -> str:
    return f"{build.domain}-artifact.{ctx.image.data['outputs']['disk'].get('format', 'qcow2')}"


def build_tag(ctx: BuildContext, build: LibvirtBuild) -> libvirt_clean.BuildTag:
    """The build's tag: its run id, domain and the volumes the plugin makes for it (the
    install source's volume is shared by builds and kept)."""
    return libvirt_clean.BuildTag(run=ctx.run_uuid, image=ctx.image.name,
                                  pool=build.settings.pool, domain=build.domain,
                                  volumes=(oemdrv_volume(build), artifact_volume(ctx, build)))


def state(ctx: BuildContext) -> LibvirtBuild:
    build: LibvirtBuild | None = ctx.state.get("libvirt")
    if build is None:
        build = ctx.state["libvirt"] = LibvirtBuild(
            settings=Settings.from_site(ctx.site, ctx.root), domain=domain_name(ctx))
    return build


# --- the install source ----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str  # iso or disk
    location: str  # a local path or an http(s) URL
    sha256: str
    volume: str
    format: str


def source_of(ctx: BuildContext) -> Source:
    src = ctx.site.data.get("sources", {}).get(ctx.image.name) or ctx.image.data["source"]
    kind = "disk" if "disk" in src else "iso"
    shown = f"images/{ctx.image.name}/image.yaml"
    if not ctx.source_checksum.startswith("sha256:"):
        raise ConfigError(f"{shown}: source.checksum: the libvirt backend names the pool "
                          f"volume by the source's sha256: give sha256:HEX, or file:PATH of "
                          f"a local sha256sum file (not {ctx.source_checksum!r})")
    digest = ctx.source_checksum.removeprefix("sha256:")
    suffix = Path(ctx.source_url.split("?", 1)[0]).suffix.lower()
    fmt = "raw" if kind == "iso" or suffix in (".raw", ".img") else "qcow2"
    ext = ".iso" if kind == "iso" else f".{fmt}"
    return Source(kind, ctx.source_url, digest,
                  lv.source_volume_name(ctx.image.name, digest, ext), fmt)


def source_size(location: str) -> int | None:
    """Bytes of a local source; None for a URL (its Content-Length is read at upload)."""
    if "://" in location:
        return None
    return Path(location).stat().st_size


@contextlib.contextmanager
def _open_url(url: str) -> Iterator[IO[bytes]]:
    import requests

    with requests.get(url, stream=True, timeout=60) as resp:
        resp.raise_for_status()
        # read as it is: an ISO is sent without content-coding
        yield cast(IO[bytes], resp.raw)


def _url_size(url: str) -> int:
    import requests

    try:
        resp = requests.head(url, allow_redirects=True, timeout=60)
        resp.raise_for_status()
        return int(resp.headers["Content-Length"])
    except (requests.RequestException, KeyError, ValueError) as e:
        why = net_reason(e) if isinstance(e, OSError | requests.RequestException) else \
            "no Content-Length"
        raise BuildError(f"{url}: cannot tell its size for the upload ({why})",
                         hint="the server must answer HEAD with a Content-Length") from None


# --- steps -----------------------------------------------------------------------------------


def _packer_checks(ctx: BuildContext, settings: Settings) -> list[Check]:
    binary = ctx.site.packer_binary
    want = tuple(int(p) for p in settings.packer_min_version.split("."))
    try:
        have = packer.version(binary)
    except BuildError as e:
        return [Check("packer version", False, f"{binary!r} cannot be run ({e.message})",
                         "install Packer 1.14 and set packer.binary in the site file",
                         "packer.binary")]
    have_text = ".".join(map(str, have))
    if have < want:
        return [Check(
            "packer version", False,
            f"packer {have_text} is too old for the libvirt plugin (needs "
            f"{settings.packer_min_version} or newer)",
            f"Packer {settings.packer_min_version}+ reads the packer {{ required_plugins }} "
            f"block and speaks the plugin's protocol: install Packer 1.14 from "
            f"releases.hashicorp.com and set packer.binary in the site file", "packer.binary")]
    checks = [Check("packer version", True, f"packer {have_text}")]
    checks.append(_plugin_check(binary, have, settings))
    return checks


def _plugin_check(binary: str, have: tuple[int, int, int], settings: Settings) -> Check:
    source = hclschema.plugin_info()["source"]
    install = f"packer plugins install {source} v{settings.plugin_version}"
    if have < (1, 8, 0):
        return Check("libvirt plugin", True, f"not listed (packer {'.'.join(map(str, have))}"
                        f" cannot list plugins; {install} installs it)")
    result = runner.run([binary, "plugins", "installed"], check=False)
    listed = "\n".join(result.tail)
    if source in listed and f"v{settings.plugin_version}" in listed:
        return Check("libvirt plugin", True, f"{source} v{settings.plugin_version}")
    return Check("libvirt plugin", False,
                    f"{source} v{settings.plugin_version} is not installed",
                    f"{install} (or packer init on the rendered file)", "libvirt.plugin_version")


def _iso_tool_check() -> Check:
    for tool in ISO_TOOLS:
        if shutil.which(tool):
            return Check("CD maker", True, f"{tool} (the plugin makes the OEMDRV CD with it)")
    return Check("CD maker", False, "none of xorriso, mkisofs, hdiutil, oscdimg is on PATH "
                    "(the plugin makes the kickstart CD with one)", "apt-get install -y xorriso")


def step_preflight(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """Named checks before anything is made on the hypervisor; every failure with its hint."""
    build = state(ctx)
    s = build.settings
    src = source_of(ctx)
    size = source_size(src.location)
    if size is None:
        size = _url_size(src.location)
    need = parse_size(ctx.image.data["disk_size"])
    req = preflight.PreflightRequest(uri=s.uri, pool=s.pool, network=s.network, bridge=s.bridge,
                              need_bytes=need, source=(src.volume, size, src.sha256))
    checks, conn = preflight.check_hypervisor(req)
    if conn is not None:
        build.conn = conn
        stack.callback(_close, conn)
        stack.push(_BuildCleanup(ctx, build))
    checks += _packer_checks(ctx, s)
    checks.append(_iso_tool_check())
    build.checks = checks
    for c in checks:
        ctx.reporter.info(f"    {'ok' if c.ok else 'FAILED'} {c.name}: {c.detail}")
    preflight.raise_failed(checks, s.shown)


def _close(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


class _BuildCleanup:
    """Exit callback: remove the build's domain and volumes, whatever way the build ends.

    After a failure with --keep-failed they stay, for a look with virsh; the message says how
    to remove them later."""

    def __init__(self, ctx: BuildContext, build: LibvirtBuild) -> None:
        self.ctx, self.build = ctx, build

    def __call__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> bool:
        ctx, build = self.ctx, self.build
        if build.tag is None:
            return False  # Packer never ran: the plugin made nothing
        if et is not None and ctx.keep_failed:
            ctx.reporter.info(f"    kept domain {build.domain} and its volumes "
                              f"({build.settings.pool}/{build.domain}-*) for inspection; "
                              f"'./build.py clean --yes' removes them")
            return False
        try:
            removed = libvirt_clean.remove_build(build.conn, build.tag)
        except Exception as err:
            ctx.reporter.warn(f"could not remove {build.domain} and its volumes: "
                              f"{lv.error_text(err)}; './build.py clean --yes' will")
            return False
        if removed:
            ctx.reporter.info(f"    removed {', '.join(removed)}")
        return False


class _DomainTagger:
    """While Packer runs, puts the build's tag on its domain as soon as the plugin has
    defined it (the plugin has no field for domain <metadata>)."""

    def __init__(self, conn: Any, tag: libvirt_clean.BuildTag) -> None:
        self.conn, self.tag = conn, tag
        self.tagged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="libvirt-tag")
        self._thread.start()

    def _watch(self) -> None:
        while not self.tagged and not self._stop.wait(0.2):
            self.tagged = libvirt_clean.tag_domain(self.conn, self.tag)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.tagged:  # one last look: a domain Packer left behind gets its tag too
            self.tagged = libvirt_clean.tag_domain(self.conn, self.tag)


def step_tag(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The build's record into the pool before Packer makes anything, and its tag on the
    domain when there is one: `./build.py clean` removes only what carries them."""
    build = state(ctx)
    tag = build_tag(ctx, build)
    libvirt_clean.write_record(build.conn, tag)
    build.tag = tag
    stack.callback(_DomainTagger(build.conn, tag).stop)  # runs before _BuildCleanup
    ctx.reporter.info(f"    {tag.pool}/{tag.record_name}: domain {tag.domain}, volumes "
                      f"{', '.join(tag.volumes)}")


@contextlib.contextmanager
def _upload_lock(ctx: BuildContext, s: Settings, volume: str) -> Iterator[None]:
    """One upload of a source volume at a time from this machine: a second build of the same
    image waits for the first one's upload and then finds the volume there. (Builds of one
    image started on two machines at the same moment would both upload; one fails.)"""
    import hashlib

    from osimage.build.accel import cache_home

    key = hashlib.sha256(f"{s.uri}\0{s.pool}\0{volume}".encode()).hexdigest()[:16]
    path = cache_home() / "libvirt-uploads" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(path, lambda: ctx.reporter.info(
            f"    waiting for another build's upload of {volume}")):
        yield


def step_upload(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    build = state(ctx)
    s = build.settings
    src = source_of(ctx)
    if "://" in src.location:
        size = _url_size(src.location)

        def opener() -> contextlib.AbstractContextManager[IO[bytes]]:
            return _open_url(src.location)
    else:
        size = Path(src.location).stat().st_size

        def opener() -> contextlib.AbstractContextManager[IO[bytes]]:
            return Path(src.location).open("rb")

    with _upload_lock(ctx, s, src.volume):
        result = libvirt_streams.ensure_source_volume(build.conn, s.pool, src.volume,
                                                      src.format, size, src.sha256, opener,
                                                      progress=ctx.reporter.info)
    build.source = result
    if result.uploaded:
        ctx.reporter.info(f"    uploaded {s.pool}/{src.volume}: {human(size)} in "
                          f"{result.seconds:.1f} s, sha256 checked before and after")
    else:
        ctx.reporter.info(f"    {s.pool}/{src.volume} is in the pool already "
                          f"(sha256 {src.sha256[:16]}...)")


def boot_command_for_libvirt(commands: list[str], shown: str) -> list[str]:
    """Packer's HTTP server URLs become the OEMDRV CD: the plugin has no HTTP server."""
    out = []
    for i, line in enumerate(commands):
        new = _HTTP_URL.sub(OEMDRV_URL, line)
        if ".HTTPIP" in new or ".HTTPPort" in new:
            raise ConfigError(f"{shown}: boot_command[{i}]: the libvirt plugin has no HTTP "
                              f"server; write http://{{{{ .HTTPIP }}}}:{{{{ .HTTPPort }}}}/PATH "
                              f"only as a whole URL prefix (it becomes {OEMDRV_URL}PATH)")
        out.append(new)
    return out


def libvirt_variables(ctx: BuildContext, build: LibvirtBuild,
                      base: dict[str, Any]) -> dict[str, Any]:
    """The libvirt template's variables, besides the qemu template's (base)."""
    s = build.settings
    data = ctx.image.data
    shown = f"images/{ctx.image.name}/image.yaml"
    src = source_of(ctx)
    size = build.source.size if build.source is not None else source_size(src.location)
    # The folder Packer's HTTP server would serve (rendered for this build when it holds
    # templates): on the OEMDRV CD instead, each entry at the CD's root.
    http_dir = Path(base["http_directory"]) if base.get("http_directory") else None
    files = sorted(str(p) for p in http_dir.iterdir()) if http_dir is not None else []
    assert ctx.key_file is not None
    public_key = Path(str(ctx.key_file) + ".pub").read_text()
    fmt = data["outputs"]["disk"].get("format", "qcow2")
    return {
        "builder_source": "libvirt",
        "plugin_source": hclschema.plugin_info()["source"],
        "plugin_version": s.plugin_version,
        "libvirt_uri": s.uri,
        "domain_name": build.domain,
        "domain_type": s.domain_type,
        "pool": s.pool,
        "network": ({"type": "bridge", "bridge": s.bridge} if s.bridge
                    else {"type": "managed", "network": s.network}),
        "address_source": s.address_source,
        "disk_bus": s.disk_bus,
        "cdrom_bus": s.cdrom_bus,
        # The volume exists when Packer runs; its size is only read. Unknown for a URL source
        # at render time (./build.py render does not fetch it).
        "source": {"kind": src.kind, "volume": src.volume, "format": src.format,
                   "capacity": f"{size}B" if size else "1M"},
        "oemdrv": {"volume": oemdrv_volume(build), "files": files,
                   "contents": {"osimage/authorized_keys": public_key}},
        "http_note": f"from {display_path(http_dir, ctx.root)}/" if http_dir
        else "none for this image",
        "artifact": {"volume": artifact_volume(ctx, build), "format": fmt,
                     "capacity": data["disk_size"]},
        "boot_devices": ["hd", "cdrom"] if src.kind == "iso" else ["hd"],
        "boot_command": boot_command_for_libvirt(data.get("boot_command", []), shown),
        "shutdown_timeout": "5m",
    }


def step_render(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    build = state(ctx)
    ctx.accelerator = build.settings.domain_type
    base = core.template_variables(ctx)
    variables = {**base, **libvirt_variables(ctx, build, base)}
    text = render.render(ctx.root / "templates", "libvirt.pkr.hcl.j2", variables)
    hcl = ctx.work_dir / f"{ctx.image.name}.pkr.hcl"
    core.fresh_output(ctx, hcl, text)
    shown = display_path(hcl, ctx.root)
    parsed = hclschema.check_text(text, shown)
    if not render.sources_of(parsed):
        raise BuildError(f"{hcl}: the rendered HCL has no source block")
    ctx.inputs_sha256 = core.inputs_hash(ctx)
    plugin = hclschema.plugin_info()
    note = _validate_with_packer(ctx, build, hcl)
    ctx.reporter.info(f"    rendered {shown}: checked against the fields of {plugin['source']} "
                      f"{plugin['version']}; {note}")


def _validate_with_packer(ctx: BuildContext, build: LibvirtBuild, hcl: Path) -> str:
    """packer validate, when the configured Packer can load the plugin (>= 1.7, installed)."""
    binary = ctx.site.packer_binary
    try:
        have = packer.version(binary)
    except BuildError:
        return "packer validate skipped (packer cannot be run)"
    want = tuple(int(p) for p in build.settings.packer_min_version.split("."))
    if have < want:
        return (f"packer validate skipped (packer {'.'.join(map(str, have))} cannot load the "
                f"plugin)")
    if not _plugin_check(binary, have, build.settings).ok or have < (1, 8, 0):
        return "packer validate skipped (the plugin is not installed)"
    packer.validate(binary, hcl, ctx.work_dir)
    return "packer validate passed"


def step_download(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The artifact volume into build/IMAGE/VERSION/output/, hashed as it arrives."""
    build = state(ctx)
    s = build.settings
    disk = ctx.image.data["outputs"]["disk"]
    fmt = disk.get("format", "qcow2")
    name = artifact_volume(ctx, build)
    vol = lv.find_volume(build.conn, s.pool, name)
    if vol is None:
        raise BuildError(f"packer build left no artifact volume {s.pool}/{name}",
                         hint=f"see {ctx.log_file}")
    final = ctx.output_dir / f"{ctx.image.name}.{fmt}"
    # The plugin clones a source disk as qcow2, whatever the image's format.
    have_fmt = _volume_format(vol) or fmt
    compress = disk.get("compression", "none") == "zstd" and fmt == "qcow2"
    convert = compress or have_fmt != fmt
    target = final.with_name(f"{final.name}.volume") if convert else final
    # Sparse only for raw: a raw disk is mostly holes, worth not sending; in a qcow2 file
    # there are next to none, and the sparse stream costs libvirtd 5-15 % more (measured).
    got = libvirt_streams.download_stream(build.conn, vol, target, sparse=have_fmt == "raw",
                                          progress=ctx.reporter.info, what=f"download {name}")
    ctx.reporter.info(f"    {s.pool}/{name}: {human(got.size)} in {got.seconds:.1f} s "
                      f"({human(got.rate)}/s), sha256 {got.sha256}")
    if convert:
        argv = ["qemu-img", "convert", "-f", have_fmt, "-O", fmt]
        if compress:
            argv += ["-c", "-o", "compression_type=zstd"]
        runner.run([*argv, target, final], what="qemu-img convert")
        target.unlink()
        art = artifacts.record(final)
    else:
        art = artifacts.Artifact(path=final, size=got.size, sha256=got.sha256)
        artifacts.write_checksum_file(art)
    ctx.artifacts = [art]
    ctx.artifact_id = ctx.artifact_id or f"{s.pool}/{name}"
    how = (" (zstd-compressed qcow2)" if compress else f" (converted to {fmt})") if convert \
        else ""
    ctx.reporter.info(f"    {art.name}: {human(art.size)}, sha256 {art.sha256}{how}")


def _volume_format(vol: Any) -> str | None:
    import xml.etree.ElementTree as ET

    node = ET.fromstring(vol.XMLDesc(0)).find("target/format")  # noqa: S314 - libvirt XML
    return node.get("type") if node is not None else None


class Libvirt:
    name = "libvirt"
    steps = (
        # only where Packer runs: ./build.py render needs no hypervisor
        Step("libvirt preflight", step_preflight, at="before render", needs_vm=True),
        Step("upload source to pool", step_upload, at="before render", needs_vm=True),
        Step("render and validate HCL", step_render, slot="render"),
        Step("tag build on hypervisor", step_tag, at="before packer"),
        # hashed in the same pass as it is downloaded: it fills the hashing slot, so a build
        # that hashes no disk (--create-patches) downloads none
        Step("download artifact volume", step_download, slot="artifacts"),
    )
    artifact_in_output_dir = False  # the plugin leaves the disk as a pool volume


BACKEND = Libvirt()
