"""Named checks of the hypervisor before a build: connection, pool and its free space, network;
each failure with the hint that fixes it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt.streams import source_present
from osimage.errors import ConfigError
from osimage.sizes import human

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
    libvirt = lv.libvirt_module()
    virsh = f"virsh -c {req.uri}"
    try:
        pool = conn.storagePoolLookupByName(req.pool)
    except libvirt.libvirtError as e:
        hint = (f"{virsh} pool-list --all shows the pools; to make a directory pool: "
                f"{virsh} pool-define-as {req.pool} dir --target /var/lib/libvirt/images/"
                f"{req.pool} && {virsh} pool-build {req.pool} && {virsh} pool-start {req.pool}"
                f" && {virsh} pool-autostart {req.pool}")
        if not lv.is_no_such(e):
            hint = lv.error_text(e)
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
    libvirt = lv.libvirt_module()
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
                f"them, or libvirt.bridge to a host bridge") if lv.is_no_such(e) \
            else lv.error_text(e)
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
        conn = lv.connect(req.uri)
    except Exception as e:
        return [Check("connect", False, f"cannot connect to {req.uri}: {lv.error_text(e)}",
                      lv.connect_hint(req.uri), "libvirt.uri")], None
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
