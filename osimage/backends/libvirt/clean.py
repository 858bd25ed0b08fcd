"""`./build.py clean`: what failed libvirt builds left on the hypervisor, listed or removed.

The plugin leaves its domain and volumes (<domain>-<alias>) behind when a build fails in some
ways; osimage's own builds remove theirs, but a killed wrapper cannot. clean removes only what
an osimage build made, selected by the build's tag and never by a name alone:

- before Packer runs, the build writes its record into the pool: a small volume
  osimage-build-RUN.json naming the build's run id, its domain and the volumes it will make
  (libvirt volumes have no <metadata>, so the record is their tag);
- once the plugin has defined the domain, the build puts <metadata> in the osimage namespace
  on it, with the run id and the same volume names (a domain defined after the wrapper was
  killed is still found: by the record that names it and whose volumes are its disks).

A domain is the build's when it carries the tag, or when a record names it and one of its
disks is a volume of that record; a volume when a record or a tagged domain in its pool names
it. --prefix only narrows that selection (an empty or foreign prefix cannot widen it). Each is
listed with its age (the time since it was last written, from the hypervisor's timestamps);
those older than --older-than are removed with --yes (a dry run by default), and a record once
nothing of its build is left.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from osimage import config, ui
from osimage.backends.libvirt import hypervisor as lv
from osimage.errors import ConfigError
from osimage.sizes import human

# The namespace of osimage's domain <metadata>, and the record volumes' names.
TAG_NAMESPACE = "https://osimage.invalid/libvirt/build/1"
TAG_KEY = "osimage"
RECORD_PREFIX = "osimage-build-"
_RUN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_RECORD_LIMIT = 1 << 16


@dataclass(frozen=True)
class BuildTag:
    """What one osimage build makes on the hypervisor: its domain and its volumes in pool."""

    run: str  # the build's run id (a uuid4)
    image: str
    pool: str
    domain: str
    volumes: tuple[str, ...]

    @property
    def record_name(self) -> str:
        return f"{RECORD_PREFIX}{self.run}.json"

    def record_bytes(self) -> bytes:
        return json.dumps({"namespace": TAG_NAMESPACE, "run": self.run, "image": self.image,
                           "pool": self.pool, "domain": self.domain,
                           "volumes": list(self.volumes)}, indent=1).encode() + b"\n"

    def metadata_xml(self, namespaced: bool = False) -> str:
        """The domain's <metadata> element: as setMetadata takes it, or with its namespace
        declared (namespaced) for a domain XML that carries it from the start."""
        p = f"{TAG_KEY}:" if namespaced else ""
        ns = f" xmlns:{TAG_KEY}={quoteattr(TAG_NAMESPACE)}" if namespaced else ""
        vols = "".join(f"<{p}volume name={quoteattr(v)}/>" for v in self.volumes)
        return (f"<{p}build{ns} run={quoteattr(self.run)} image={quoteattr(self.image)} "
                f"pool={quoteattr(self.pool)} domain={quoteattr(self.domain)}>{vols}</{p}build>")

    @classmethod
    def checked(cls, run: Any, image: Any, pool: Any, domain: Any,
                volumes: Any) -> BuildTag | None:
        """A tag only when every field is what an osimage build writes: a run id, and volumes
        named DOMAIN-* (so no tag can name an install source or another build's volume)."""
        if not (isinstance(run, str) and _RUN.match(run) and isinstance(domain, str) and domain
                and isinstance(pool, str) and isinstance(image, str)
                and isinstance(volumes, list | tuple)
                and all(isinstance(v, str) and v.startswith(domain + "-") for v in volumes)):
            return None
        return cls(run, image, pool, domain, tuple(volumes))


def write_record(conn: Any, tag: BuildTag) -> None:
    """The build's record in its pool, written before Packer makes anything."""
    from osimage.backends.libvirt.streams import upload_stream

    data = tag.record_bytes()
    vol = lv.create_volume(conn, tag.pool, tag.record_name, len(data))
    try:
        upload_stream(conn, vol, io.BytesIO(data), len(data), what=f"write {tag.record_name}")
    except BaseException:
        with contextlib.suppress(Exception):  # a record cut short would be nobody's
            vol.delete(0)
        raise


def _read_record(conn: Any, pool: str, vol: Any) -> BuildTag | None:
    from osimage.backends.libvirt.streams import read_volume

    try:
        if lv.volume_physical_size(vol) > _RECORD_LIMIT:
            return None
        data = json.loads(read_volume(conn, vol, _RECORD_LIMIT))
    except Exception:
        return None  # not a record of ours
    if not isinstance(data, dict) or data.get("namespace") != TAG_NAMESPACE:
        return None
    tag = BuildTag.checked(data.get("run"), data.get("image"), data.get("pool"),
                           data.get("domain"), data.get("volumes"))
    if tag is None or tag.pool != pool or vol.name() != tag.record_name:
        return None
    return tag


def tag_domain(conn: Any, tag: BuildTag) -> bool:
    """Put the build's tag on its domain once the plugin has defined it; True when it is
    there (now or before), False when the domain does not exist (yet)."""
    libvirt = lv.libvirt_module()
    try:
        dom = conn.lookupByName(tag.domain)
        if domain_tag(dom) == tag:
            return True
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, tag.metadata_xml(), TAG_KEY,
                        TAG_NAMESPACE, flags)
    except libvirt.libvirtError:
        return False  # not defined yet, or it changed state meanwhile: the next try tells
    return True


def domain_tag(dom: Any) -> BuildTag | None:
    """The osimage tag of a domain: from its live definition, else its persistent one."""
    libvirt = lv.libvirt_module()
    for flags in (libvirt.VIR_DOMAIN_AFFECT_CURRENT, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, TAG_NAMESPACE, flags)
        except libvirt.libvirtError:
            continue
        try:
            root = ET.fromstring(text)  # noqa: S314 - libvirt's own XML
        except ET.ParseError:
            return None
        tag = BuildTag.checked(root.get("run"), root.get("image"), root.get("pool"),
                               root.get("domain"),
                               [v.get("name") for v in root if v.tag.endswith("volume")])
        return tag if tag is not None and tag.domain == dom.name() else None
    return None


def _records(conn: Any) -> list[tuple[BuildTag, Any]]:
    """Every build record in the active pools, with its volume."""
    found = []
    for pool in conn.listAllStoragePools(0):
        if not pool.isActive():
            continue
        with contextlib.suppress(Exception):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(RECORD_PREFIX):
                tag = _read_record(conn, pool.name(), vol)
                if tag is not None:
                    found.append((tag, vol))
    return found


@dataclass(frozen=True)
class Leftover:
    kind: str  # "domain" or "volume"
    name: str
    pool: str = ""  # volumes only
    state: str = ""  # domains: running, shut off, ...; volumes: its size
    age: float | None = None  # seconds since it was last written; None: unknown
    uuid: str = ""  # domains only: removed by it, so a domain defined anew is not

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


def _pool_of(vol: Any) -> str:
    return str(vol.storagePoolLookupByVolume().name())


def _tag_of(conn: Any, dom: Any, disks: list[Any],
            records: dict[str, BuildTag]) -> BuildTag | None:
    """The build a domain belongs to: its own tag, else the record that names it and one of
    whose volumes is one of its disks (the wrapper was killed before it could tag it)."""
    tag = domain_tag(dom)
    if tag is not None:
        return tag
    tag = records.get(dom.name())
    if tag is None:
        return None
    with contextlib.suppress(Exception):
        if any(_pool_of(v) == tag.pool and v.name() in tag.volumes for v in disks):
            return tag
    return None


def find_leftovers(conn: Any, prefix: str = lv.LEFTOVER_PREFIX,
                   now: float | None = None) -> list[Leftover]:
    """The domains and volumes (in every active pool) osimage builds made, by their tags;
    of those, the ones whose names start with prefix.

    A volume's age is the time since its file was last written or changed; a domain's is that
    of the most recently written of its volumes, so a domain still building stays young.
    """
    now = time.time() if now is None else now
    records = {tag.domain: tag for tag, _vol in _records(conn)}
    wanted = {(t.pool, v) for t in records.values() for v in t.volumes}
    found: list[Leftover] = []
    for dom in conn.listAllDomains(0):
        disks = list(_domain_disk_volumes(conn, dom))
        tag = _tag_of(conn, dom, disks, records)
        if tag is None:
            continue
        wanted |= {(tag.pool, v) for v in tag.volumes}
        name = dom.name()
        if not name.startswith(prefix):
            continue
        ages = [a for v in disks if (a := _volume_age(v, now)) is not None]
        state = _DOMAIN_STATES.get(dom.info()[0], "unknown")
        found.append(Leftover("domain", name, state=state, age=min(ages) if ages else None,
                              uuid=dom.UUIDString()))
    for pool in conn.listAllStoragePools(0):
        if not pool.isActive():
            continue
        for vol in pool.listAllVolumes(0):
            name = vol.name()
            if (pool.name(), name) not in wanted or not name.startswith(prefix):
                continue
            found.append(Leftover("volume", name, pool=pool.name(),
                                  state=human(lv.volume_physical_size(vol)),
                                  age=_volume_age(vol, now)))
    return found


def remove_domain(conn: Any, name: str, uuid: str = "") -> bool:
    """Stop and undefine a domain (the one of that uuid, when given) if it exists; True when
    there was one."""
    libvirt = lv.libvirt_module()
    try:
        dom = conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(name)
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
        remove_domain(conn, item.name, item.uuid)
    else:
        lv.delete_volume(conn, item.pool, item.name)


def remove_build(conn: Any, tag: BuildTag) -> list[str]:
    """Remove one build's domain, the volumes it named and its record; what was removed.

    Whatever state the plugin left them in (running after Ctrl-C, defined after a failed
    step, volumes kept after a failed shutdown), this leaves nothing of the build.
    """
    libvirt = lv.libvirt_module()
    removed: list[str] = []
    try:
        dom = conn.lookupByName(tag.domain)
    except libvirt.libvirtError:
        dom = None
    # A domain of that name is this build's unless it carries another build's tag.
    other = dom is not None and (t := domain_tag(dom)) is not None and t.run != tag.run
    if dom is not None and not other and remove_domain(conn, tag.domain, dom.UUIDString()):
        removed.append(f"domain {tag.domain}")
    with contextlib.suppress(Exception):
        conn.storagePoolLookupByName(tag.pool).refresh(0)
    for name in sorted(tag.volumes):
        if lv.delete_volume(conn, tag.pool, name):
            removed.append(f"volume {tag.pool}/{name}")
    lv.delete_volume(conn, tag.pool, tag.record_name)
    return removed


def remove_spent_records(conn: Any, prefix: str, older_than: float,
                         now: float | None = None) -> int:
    """Delete the records of builds of which nothing is left (and that are old enough not
    to belong to a build that has not made its domain yet); how many."""
    now = time.time() if now is None else now
    left = {(i.pool, i.name) for i in find_leftovers(conn, "", now) if i.kind == "volume"}
    domains = {d.name() for d in conn.listAllDomains(0)}
    count = 0
    for tag, vol in _records(conn):
        age = _volume_age(vol, now)
        if (not tag.domain.startswith(prefix) or tag.domain in domains
                or any((tag.pool, v) in left for v in tag.volumes)
                or (older_than > 0 and (age is None or age < older_than))):
            continue
        with contextlib.suppress(Exception):
            vol.delete(0)
            count += 1
    return count


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
    return ui.table(head, body)


def clean(uri: str, older_than: float, remove: bool, prefix: str,
          echo: Callable[[str], None]) -> list[Row]:
    with lv.connection(uri) as conn:
        rows = plan(find_leftovers(conn, prefix), older_than)
        if not rows:
            if remove:
                remove_spent_records(conn, prefix, older_than)
            echo(f"no {prefix}* domains or volumes of osimage builds on {uri}")
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
            remove_spent_records(conn, prefix, older_than)
            echo(f"removed {count} of {len(rows)} on {uri}")
        else:
            echo(f"dry run: {count} of {len(rows)} would be removed; run again with --yes to "
                 f"remove them")
    return rows
