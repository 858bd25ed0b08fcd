"""`./build.py clean`: what failed libvirt builds left on the hypervisor, listed or removed.

The plugin leaves its domain (packer-<id>) and volumes (<domain>-<alias>) behind when a build
fails in some ways; osimage's own builds remove theirs, but a killed wrapper cannot. This
finds every `packer-*` domain and every `packer-*` volume of every active pool, with its age
(the time since it was last written, from the hypervisor's timestamps), and removes those
older than --older-than, only with --yes: a dry run by default.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osimage import config
from osimage import libvirt_backend as lv
from osimage.errors import ConfigError


@dataclass(frozen=True)
class Leftover:
    kind: str  # "domain" or "volume"
    name: str
    pool: str = ""  # volumes only
    state: str = ""  # domains: running, shut off, ...; volumes: its size
    age: float | None = None  # seconds since it was last written; None: unknown

    @property
    def label(self) -> str:
        return f"{self.pool}/{self.name}" if self.pool else self.name


def _timestamps(xml_text: str) -> float | None:
    """The latest of a volume's mtime and ctime (dir, fs and netfs pools report them)."""
    root = ET.fromstring(xml_text)  # noqa: S314 - libvirt's own XML
    stamps = root.find("target/timestamps")
    if stamps is None:
        return None
    values = []
    for tag in ("mtime", "ctime"):
        node = stamps.find(tag)
        if node is not None and node.text:
            with contextlib.suppress(ValueError):
                values.append(float(node.text))
    return max(values) if values else None


def _volume_age(vol: Any, now: float) -> float | None:
    try:
        stamp = _timestamps(vol.XMLDesc(0))
    except Exception:
        return None
    return None if stamp is None else max(0.0, now - stamp)


_DOMAIN_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
                  5: "shut off", 6: "crashed", 7: "suspended"}


def _domain_disk_volumes(conn: Any, dom: Any) -> Iterable[Any]:
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    for source in root.iterfind("devices/disk/source"):
        try:
            if source.get("pool") and source.get("volume"):
                yield lv.lookup_volume(conn, source.get("pool", ""), source.get("volume", ""))
            elif source.get("file"):
                yield conn.storageVolLookupByPath(source.get("file"))
        except Exception:  # noqa: S112 - a disk outside every pool tells no age
            continue


def find_leftovers(conn: Any, prefix: str = lv.LEFTOVER_PREFIX,
                   now: float | None = None) -> list[Leftover]:
    """Domains and volumes (in every active pool) whose names start with prefix.

    A volume's age is the time since its file was last written or changed; a domain's is that
    of the most recently written of its volumes, so a domain still building stays young.
    """
    now = time.time() if now is None else now
    found: list[Leftover] = []
    for dom in conn.listAllDomains(0):
        name = dom.name()
        if not name.startswith(prefix):
            continue
        ages = [a for v in _domain_disk_volumes(conn, dom) if (a := _volume_age(v, now))
                is not None]
        state = _DOMAIN_STATES.get(dom.info()[0], "unknown")
        found.append(Leftover("domain", name, state=state, age=min(ages) if ages else None))
    for pool in conn.listAllStoragePools(0):
        if not pool.isActive():
            continue
        with contextlib.suppress(Exception):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            name = vol.name()
            if not name.startswith(prefix):
                continue
            found.append(Leftover("volume", name, pool=pool.name(),
                                  state=lv.human(lv.volume_physical_size(vol)),
                                  age=_volume_age(vol, now)))
    return found


def remove_domain(conn: Any, name: str) -> bool:
    """Stop and undefine a domain if it exists; True when there was one."""
    libvirt = lv.libvirt_module()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    if dom.isActive():
        with contextlib.suppress(libvirt.libvirtError):  # it may stop on its own meanwhile
            dom.destroy()
    if dom.isPersistent():
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            dom.undefine()
    return True


def remove_leftover(conn: Any, item: Leftover) -> None:
    if item.kind == "domain":
        remove_domain(conn, item.name)
    else:
        lv.delete_volume(conn, item.pool, item.name)


def remove_build(conn: Any, pool: str, domain: str) -> list[str]:
    """Remove one build's domain and its volumes (named DOMAIN-*) from pool; what was removed.

    Whatever state the plugin left them in (running after Ctrl-C, defined after a failed
    step, volumes kept after a failed shutdown), this leaves nothing of the build.
    """
    removed: list[str] = []
    if remove_domain(conn, domain):
        removed.append(f"domain {domain}")
    p = conn.storagePoolLookupByName(pool)
    with contextlib.suppress(Exception):
        p.refresh(0)
    for vol in sorted(p.listAllVolumes(0), key=lambda v: v.name()):
        if vol.name().startswith(domain + "-"):
            vol.delete(0)
            removed.append(f"volume {pool}/{vol.name()}")
    return removed


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def parse_age(text: str) -> float:
    """'90s', '30m', '2h', '7d' (or a bare number of seconds) as seconds."""
    s = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if s and s[-1] in units:
            return float(s[:-1]) * units[s[-1]]
        return float(s)
    except ValueError:
        raise ConfigError(f"--older-than: {text!r} is not an age (write 90s, 30m, 2h or 7d)",
                          hint=None) from None



@dataclass(frozen=True)
class Row:
    item: Leftover
    action: str  # "remove", "removed", "keep (younger than 2h)", ...


def resolve_uri(root: Path, site_file: Path | None, uri: str | None) -> str:
    if uri:
        return uri
    site = config.load_site(root, site_file)
    section = site.data.get("libvirt")
    if isinstance(section, dict) and section.get("uri"):
        return str(section["uri"])
    shown = config.display_path(site.path, root) if site.path else "the embedded defaults"
    raise ConfigError(f"clean: no hypervisor: {shown} has no libvirt.uri; give --uri URI or "
                      f"a site file with backend: libvirt")


def plan(items: list[Leftover], older_than: float) -> list[Row]:
    """Which leftovers go: those older than older_than; one of unknown age only when
    older_than is 0 (it may belong to a build that is running)."""
    rows = []
    for item in sorted(items, key=lambda i: (i.kind, i.label)):
        if item.age is None:
            action = "remove" if older_than <= 0 else "keep (age unknown)"
        elif item.age >= older_than:
            action = "remove"
        else:
            action = f"keep (younger than {format_age(older_than)})"
        rows.append(Row(item, action))
    return rows


def table(rows: list[Row]) -> list[str]:
    head = ("KIND", "NAME", "STATE/SIZE", "AGE", "ACTION")
    body = [(r.item.kind, r.item.label, r.item.state, format_age(r.item.age), r.action)
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in (head, *body)]


def clean(uri: str, older_than: float, remove: bool, prefix: str,
          echo: Callable[[str], None]) -> list[Row]:
    with lv.connection(uri) as conn:
        rows = plan(find_leftovers(conn, prefix), older_than)
        if not rows:
            echo(f"no {prefix}* domains or volumes on {uri}")
            return rows
        if remove:
            # Domains first: a volume of a running domain is still in use.
            done: list[Row] = []
            for row in sorted(rows, key=lambda r: r.item.kind != "domain"):
                if row.action == "remove":
                    remove_leftover(conn, row.item)
                done.append(Row(row.item, "removed") if row.action == "remove" else row)
            rows = sorted(done, key=lambda r: (r.item.kind, r.item.label))
        for line in table(rows):
            echo(line)
        count = sum(r.action == ("removed" if remove else "remove") for r in rows)
        if remove:
            echo(f"removed {count} of {len(rows)} on {uri}")
        else:
            echo(f"dry run: {count} of {len(rows)} would be removed; run again with --yes to "
                 f"remove them")
    return rows
