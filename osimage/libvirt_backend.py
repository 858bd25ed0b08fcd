"""The libvirt hypervisor through libvirt-python: what the Packer plugin leaves to the wrapper.

The plugin (github.com/thomasklein94/libvirt) boots the build's domain and leaves the image as
a volume in a storage pool. Around it, this module connects to the hypervisor, checks it
before a build (named checks, each with a hint) and puts the install source into the pool;
libvirt_streams.py moves the bytes, libvirt_clean.py removes what builds leave behind. Every
byte goes through libvirt streams, so a remote hypervisor (qemu+ssh://) works the same as a
local one: nothing reads or writes the hypervisor's files directly.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any
from xml.sax.saxutils import escape

from osimage.errors import BuildError, ConfigError
from osimage.runner import check_interrupted

# What a build leaves behind, and what `./build.py clean` looks for: the plugin names its
# domains packer-<id> and their volumes <domain>-<alias>; osimage names them the same way.
LEFTOVER_PREFIX = "packer-"
# Install sources uploaded by osimage: kept in the pool across builds, never cleaned.
SOURCE_PREFIX = "osimage-src-"
CONNECT_TIMEOUT = 60.0

Progress = Callable[[str], None]


def libvirt_module() -> Any:
    """The libvirt module, imported on first use, with libvirt's own stderr printing silenced
    (every error is raised as an exception and reported once, by the caller)."""
    try:
        import libvirt
    except ImportError:
        raise ConfigError("backend libvirt: the Python module 'libvirt' is not installed",
                          hint="pip install libvirt-python (needs pkg-config, gcc and "
                               "libvirt-dev), or run scripts/setup.sh") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def error_text(e: BaseException) -> str:
    """libvirt's message without the 'operation failed: ' noise, on one line."""
    text = str(e).strip().replace("\n", " ")
    return text or type(e).__name__


def is_no_such(e: BaseException) -> bool:
    libvirt = libvirt_module()
    code = e.get_error_code() if isinstance(e, libvirt.libvirtError) else None
    return code in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_NETWORK)


# --- connecting ------------------------------------------------------------------------------


def connect(uri: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """Open a read-write connection to uri; raise libvirt's error, or TimeoutError.

    The open runs in a helper thread: an SSH transport to a hypervisor that does not answer can
    block for minutes, and the build must stay interruptible meanwhile.
    """
    libvirt = libvirt_module()
    result: dict[str, Any] = {}

    def opener() -> None:
        try:
            result["conn"] = libvirt.open(uri)
        except Exception as e:  # handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=opener, daemon=True, name="libvirt-open")
    t.start()
    deadline = time.monotonic() + timeout
    while t.is_alive():
        t.join(0.2)
        check_interrupted()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {uri} within {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["conn"]


def connect_hint(uri: str) -> str:
    if "+ssh://" in uri:
        host = uri.split("://", 1)[1].split("/", 1)[0]
        return (f"the hypervisor must accept 'ssh {host}' without a password (a key in "
                f"ssh-agent, or ?keyfile=PATH in the URI) and run libvirtd")
    return "start libvirtd (virtlogd -d; libvirtd -d without systemd), or fix the URI"


@contextlib.contextmanager
def connection(uri: str) -> Iterator[Any]:
    """An open connection for a command; libvirt's errors become one BuildError line."""
    libvirt = libvirt_module()
    try:
        conn = connect(uri)
    except (libvirt.libvirtError, TimeoutError) as e:
        raise BuildError(f"cannot connect to {uri}: {error_text(e)}",
                         hint=connect_hint(uri)) from None
    try:
        yield conn
    except libvirt.libvirtError as e:
        raise BuildError(f"{uri}: {error_text(e)}") from None
    finally:
        with contextlib.suppress(Exception):
            conn.close()


# --- sizes and names -------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'20G', '512M', '1048576B' as bytes (binary units, as image.yaml and libvirt use them)."""
    s = text.strip().upper()
    digits = len(s) - len(s.lstrip("0123456789"))
    if digits == 0 or s[digits:] not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(s[:digits]) * _UNITS[s[digits:]]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def source_volume_name(image: str, sha256: str, suffix: str) -> str:
    """The pool volume of an install source: named by content, so a changed ISO is a new
    volume and an unchanged one is uploaded once for every build after."""
    return f"{SOURCE_PREFIX}{image}-{sha256[:16]}{suffix}"


def stamp_name(volume: str) -> str:
    return volume + ".sha256"


# --- preflight -------------------------------------------------------------------------------


@dataclass
class Check:
    """One named preflight check: what it found, and how to fix it when it failed."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    key: str = ""  # the site file key the check is about


@dataclass
class PreflightRequest:
    uri: str
    pool: str
    network: str | None
    bridge: str | None
    need_bytes: int  # free space the pool must have for the disk
    # The install source (volume, size, sha256): its size is needed too unless it is there.
    source: tuple[str, int, str] | None = None


def _pool_check(conn: Any, req: PreflightRequest) -> tuple[list[Check], Any]:
    libvirt = libvirt_module()
    virsh = f"virsh -c {req.uri}"
    try:
        pool = conn.storagePoolLookupByName(req.pool)
    except libvirt.libvirtError as e:
        hint = (f"{virsh} pool-list --all shows the pools; to make a directory pool: "
                f"{virsh} pool-define-as {req.pool} dir --target /var/lib/libvirt/images/"
                f"{req.pool} && {virsh} pool-build {req.pool} && {virsh} pool-start {req.pool}"
                f" && {virsh} pool-autostart {req.pool}")
        if not is_no_such(e):
            hint = error_text(e)
        return [Check("storage pool", False, f"storage pool '{req.pool}' does not exist",
                      hint, "libvirt.pool")], None
    if not pool.isActive():
        return [Check("storage pool", False, f"storage pool '{req.pool}' exists but is not "
                      f"active", f"{virsh} pool-start {req.pool} && {virsh} pool-autostart "
                      f"{req.pool}", "libvirt.pool")], None
    checks = [Check("storage pool", True, f"'{req.pool}' is active")]
    with contextlib.suppress(libvirt.libvirtError):
        pool.refresh(0)  # free space as it is now, not at the last refresh
    _state, _capacity, _allocation, available = pool.info()
    need = req.need_bytes
    if req.source is not None and not source_present(conn, req.pool, *req.source):
        need += req.source[1]
    if available < need:
        checks.append(Check(
            "free space in pool", False,
            f"storage pool '{req.pool}' has {human(available)} free, the build needs "
            f"{human(need)}",
            f"free space in the pool: './build.py clean --yes' removes what failed builds "
            f"left behind; {virsh} vol-list {req.pool} --details lists the rest",
            "libvirt.pool"))
    else:
        checks.append(Check("free space in pool", True,
                            f"{human(available)} free, {human(need)} needed"))
    return checks, pool


def _network_check(conn: Any, req: PreflightRequest) -> Check:
    libvirt = libvirt_module()
    virsh = f"virsh -c {req.uri}"
    if req.bridge:
        try:
            iface = conn.interfaceLookupByName(req.bridge)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                return Check("network", True, f"bridge '{req.bridge}' (the hypervisor cannot "
                             f"list its interfaces; not checked)")
            return Check("network", False, f"bridge '{req.bridge}' does not exist on the "
                         f"hypervisor", f"{virsh} iface-list --all shows its interfaces; "
                         f"set libvirt.bridge to one of them, or use libvirt.network",
                         "libvirt.bridge")
        # No link yet is normal for a bridge no domain is attached to: it exists, that will do.
        link = "up" if iface.isActive() else "no link yet"
        return Check("network", True, f"bridge '{req.bridge}' ({link})")
    name = req.network or "default"
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError as e:
        hint = (f"{virsh} net-list --all shows the networks; set libvirt.network to one of "
                f"them, or libvirt.bridge to a host bridge") if is_no_such(e) else error_text(e)
        return Check("network", False, f"network '{name}' does not exist", hint,
                     "libvirt.network")
    if not net.isActive():
        return Check("network", False, f"network '{name}' exists but is not active",
                     f"{virsh} net-start {name} && {virsh} net-autostart {name}",
                     "libvirt.network")
    return Check("network", True, f"'{name}' is active")


def check_hypervisor(req: PreflightRequest) -> tuple[list[Check], Any]:
    """Connect, then check the pool, its free space and the network; return the checks and
    the open connection (None when connecting failed)."""
    try:
        conn = connect(req.uri)
    except Exception as e:
        return [Check("connect", False, f"cannot connect to {req.uri}: {error_text(e)}",
                      connect_hint(req.uri), "libvirt.uri")], None
    checks = [Check("connect", True, f"{req.uri} (libvirt {_version_text(conn)})")]
    pool_checks, _pool = _pool_check(conn, req)
    checks += pool_checks
    checks.append(_network_check(conn, req))
    return checks, conn


def _version_text(conn: Any) -> str:
    v = int(conn.getLibVersion())
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def raise_failed(checks: list[Check], shown: str) -> None:
    """One ConfigError for the failed checks: the first in the message, all with their hints."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return
    first = failed[0]
    key = f"{first.key}: " if first.key else ""
    more = f" (and {len(failed) - 1} more failed check{'s' if len(failed) > 2 else ''})" \
        if len(failed) > 1 else ""
    lines: list[str] = []
    for c in failed:
        lines.append(f"{c.name}: {c.detail}")
        if c.hint:
            lines.append(f"  hint: {c.hint}")
    raise ConfigError(f"{shown}: {key}preflight check '{first.name}' failed: {first.detail}"
                      f"{more}", hint="\n".join(lines))


def lookup_volume(conn: Any, pool: str, name: str) -> Any:
    return conn.storagePoolLookupByName(pool).storageVolLookupByName(name)


def find_volume(conn: Any, pool: str, name: str) -> Any | None:
    libvirt = libvirt_module()
    try:
        return lookup_volume(conn, pool, name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def volume_physical_size(vol: Any) -> int:
    """Bytes the volume's file holds (for qcow2 the file, not the virtual disk)."""
    libvirt = libvirt_module()
    try:
        return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
    except (libvirt.libvirtError, AttributeError):
        return int(vol.info()[2])


def volume_xml(name: str, capacity: int, fmt: str, allocation: int = 0) -> str:
    return (f"<volume><name>{escape(name)}</name>"
            f"<capacity unit='bytes'>{capacity}</capacity>"
            f"<allocation unit='bytes'>{allocation}</allocation>"
            f"<target><format type='{escape(fmt)}'/></target></volume>")


def create_volume(conn: Any, pool: str, name: str, capacity: int, fmt: str = "raw") -> Any:
    return conn.storagePoolLookupByName(pool).createXML(volume_xml(name, capacity, fmt), 0)


def delete_volume(conn: Any, pool: str, name: str) -> bool:
    """Delete a volume if it exists; True when one was deleted."""
    vol = find_volume(conn, pool, name)
    if vol is None:
        return False
    vol.delete(0)
    return True


@dataclass(frozen=True)
class SourceVolume:
    pool: str
    name: str
    size: int
    sha256: str
    uploaded: bool  # False: it was in the pool already
    seconds: float = 0.0


def source_present(conn: Any, pool: str, name: str, size: int, sha256: str) -> bool:
    """The source volume is there and complete: its stamp (written only after the upload was
    verified) names this sha256, and the volume holds size bytes."""
    vol = find_volume(conn, pool, name)
    stamp = find_volume(conn, pool, stamp_name(name))
    if vol is None or stamp is None:
        return False
    from osimage.libvirt_streams import read_volume

    text = read_volume(conn, stamp).decode(errors="replace")
    words = text.split()
    return (len(words) >= 2 and words[0] == sha256 and words[1] == name
            and volume_physical_size(vol) >= size)


def ensure_source_volume(conn: Any, pool: str, name: str, fmt: str, size: int, sha256: str,
                         opener: Callable[[], contextlib.AbstractContextManager[IO[bytes]]],
                         progress: Progress | None = None) -> SourceVolume:
    """Put an install source into the pool unless it is there already.

    The bytes are hashed as they are sent and must match sha256 (the image's checksum); then
    they are read back out of the pool and hashed again, and the volume must hold size bytes.
    Only then is the stamp volume NAME.sha256 written, which is what makes the volume count
    as present: an upload cut short (Ctrl-C, kill -9, a lost connection) is never reused.
    """
    from osimage.libvirt_streams import hash_volume, upload_stream

    if source_present(conn, pool, name, size, sha256):
        return SourceVolume(pool, name, size, sha256, uploaded=False)
    delete_volume(conn, pool, stamp_name(name))
    delete_volume(conn, pool, name)
    t0 = time.monotonic()
    vol = create_volume(conn, pool, name, size, fmt)
    try:
        with opener() as source:
            sent = upload_stream(conn, vol, source, size, progress, what=f"upload {name}")
        if sent.sha256 != sha256:
            raise BuildError(f"upload of {name}: the source's sha256 is {sent.sha256}, the "
                             f"image's checksum says {sha256}",
                             hint="the source changed, or source.checksum in image.yaml is "
                                  "wrong")
        back = hash_volume(conn, vol, size, progress, what=f"verify {name}")
        physical = volume_physical_size(vol)
        if back.size != size or physical < size:
            raise BuildError(f"upload of {name}: the pool volume holds {min(back.size, physical)}"
                             f" bytes, {size} were sent")
        if back.sha256 != sha256:
            raise BuildError(f"upload of {name}: read back from pool {pool}, its sha256 is "
                             f"{back.sha256}, not {sha256}")
        stamp = f"{sha256}  {name}\n".encode()
        stamp_vol = create_volume(conn, pool, stamp_name(name), len(stamp), "raw")
        upload_stream(conn, stamp_vol, io.BytesIO(stamp), len(stamp), what="stamp")
    except BaseException:
        with contextlib.suppress(Exception):
            delete_volume(conn, pool, stamp_name(name))
        with contextlib.suppress(Exception):
            vol.delete(0)
        raise
    return SourceVolume(pool, name, size, sha256, uploaded=True,
                        seconds=time.monotonic() - t0)


