"""The native libvirt driver's own parts: osimage runs the build VM through libvirt itself.

Not wired into the pipeline yet (issue 15). What is here works against any libvirtd, local or
qemu+ssh://, through libvirt-python only:

- Packer's boot_command notation (`<tab>`, `<enter>`, `<wait5>`, `<leftCtrlOn>x<leftCtrlOff>`,
  ... as Packer's bootcommand grammar reads it) parsed into key chords and waits, and typed into
  a domain with virDomainSendKey (Linux keycodes, a US keyboard);
- the build's volumes and domain: a qcow2 copy-on-write overlay on the source volume in the
  pool, and a domain tagged with osimage's <metadata> (the namespace and element that
  `./build.py clean` selects by), the build's public key handed to the guest by fw_cfg
  (opt/osimage/authorized_keys, as the qemu backend does);
- the guest's IPv4 address from the network's DHCP lease, ARP or the guest agent, polled with
  a timeout, stoppable by Ctrl-C;
- shutdown: the ACPI power button, then destroy after a timeout; and removal of all of it.
"""

from __future__ import annotations

import contextlib
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from xml.sax.saxutils import escape, quoteattr

from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt.clean import BuildTag
from osimage.errors import BuildError, ConfigError
from osimage.runner import check_interrupted

FW_CFG_KEY = "opt/osimage/authorized_keys"

# --- boot_command ----------------------------------------------------------------------------

# Linux input event codes (linux/input-event-codes.h), the set virDomainSendKey is given.
SPECIAL_KEYS = {
    "bs": 14, "del": 111, "enter": 28, "return": 28, "esc": 1, "tab": 15, "spacebar": 57,
    "insert": 110, "home": 102, "end": 107, "pageup": 104, "pagedown": 109,
    "up": 103, "down": 108, "left": 105, "right": 106, "menu": 127,
    "leftalt": 56, "rightalt": 100, "leftctrl": 29, "rightctrl": 97,
    "leftshift": 42, "rightshift": 54, "leftsuper": 125, "rightsuper": 126,
    **{f"f{n}": 58 + n for n in range(1, 11)}, "f11": 87, "f12": 88,
}
KEY_LEFTSHIFT = 42
_ROWS = [("1234567890-=", 2), ("qwertyuiop[]", 16), ("asdfghjkl;'`", 30), ("zxcvbnm,./", 44)]
_SHIFTED_ROWS = [("!@#$%^&*()_+", 2), ("QWERTYUIOP{}", 16), ('ASDFGHJKL:"~', 30),
                 ("ZXCVBNM<>?", 44)]
# Character -> (keycode, needs shift) on a US keyboard.
CHARS: dict[str, tuple[int, bool]] = {
    **{c: (first + i, False) for row, first in _ROWS for i, c in enumerate(row)},
    **{c: (first + i, True) for row, first in _SHIFTED_ROWS for i, c in enumerate(row)},
    "\\": (43, False), "|": (43, True), " ": (57, False), "\n": (28, False), "\t": (15, False),
}
MAX_CHORD = 16  # VIR_DOMAIN_SEND_KEY_MAX_KEYS

# Packer's grammar, in its order: <wait...>, <XOn>/<XOff> of one character, <reboot>, a
# special key (optionally On/Off), else the character itself ('<' included). Key names and
# On/Off are case-insensitive, "wait" is not; a bare number waits that many seconds.
_UNIT = r"(?:ns|us|µs|ms|s|m|h)"
_DURATION = rf"(?:-?(?:0|[1-9]\d*)(?:\.\d+)?{_UNIT})+"
_WAIT = re.compile(rf"<wait({_DURATION}|0|[1-9]\d*)?>")
_TOGGLE = re.compile(r"<(.)(on|off)>", re.IGNORECASE | re.DOTALL)
_REBOOT = re.compile(r"<reboot>", re.IGNORECASE)
_SPECIAL = re.compile(r"<(" + "|".join(sorted(SPECIAL_KEYS, key=len, reverse=True))
                      + r")(on|off)?>", re.IGNORECASE)
_PART = re.compile(rf"(-?(?:0|[1-9]\d*)(?:\.\d+)?)({_UNIT})")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Keys:
    """Keys pressed together and released (one virDomainSendKey call)."""

    codes: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    seconds: float


Action = Keys | Wait


def _wait_seconds(text: str | None, where: str) -> float:
    if text is None:
        return 1.0
    if text.isdigit():
        return float(text)
    total = 0.0
    for number, unit in _PART.findall(text):
        if number.startswith("-"):
            raise ConfigError(f"{where}: <wait{text}>: a wait cannot be negative")
        total += float(number) * _SECONDS[unit]
    return total


def _char_code(ch: str, where: str) -> tuple[int, bool]:
    try:
        return CHARS[ch]
    except KeyError:
        raise ConfigError(f"{where}: cannot type {ch!r} (a US keyboard types printable ASCII; "
                          f"use Packer's special keys such as <enter> for the rest)") from None


def parse_boot_command(command: str | Sequence[str], where: str = "boot_command") -> list[Action]:
    """Packer's boot_command (a string, or a list typed one after the other) as key chords and
    waits. A key turned on (`<leftCtrlOn>`) is held in every chord until it is turned off:
    virDomainSendKey presses a chord and releases it, so `<leftCtrlOn>c<leftCtrlOff>` is one
    chord Ctrl+C."""
    text = command if isinstance(command, str) else "".join(command)
    actions: list[Action] = []
    held: list[int] = []

    def press(*codes: int) -> None:
        chord = tuple(dict.fromkeys((*held, *codes)))
        if len(chord) > MAX_CHORD:
            raise ConfigError(f"{where}: {len(chord)} keys held at once (at most {MAX_CHORD})")
        actions.append(Keys(chord))

    def toggle(code: int, on: bool) -> None:
        if on and code not in held:
            held.append(code)
        elif not on and code in held:
            held.remove(code)

    i = 0
    while i < len(text):
        if text[i] == "<":
            if m := _WAIT.match(text, i):
                actions.append(Wait(_wait_seconds(m.group(1), where)))
            elif m := _TOGGLE.match(text, i):
                code, shift = _char_code(m.group(1), where)
                if shift:
                    toggle(KEY_LEFTSHIFT, m.group(2).lower() == "on")
                toggle(code, m.group(2).lower() == "on")
            elif _REBOOT.match(text, i):
                raise ConfigError(f"{where}: <reboot> is a Hyper-V key of Packer's; a libvirt "
                                  f"domain cannot be rebooted from the keyboard")
            elif m := _SPECIAL.match(text, i):
                code = SPECIAL_KEYS[m.group(1).lower()]
                if m.group(2) is None:
                    press(code)
                else:
                    toggle(code, m.group(2).lower() == "on")
            else:
                m = None
            if m is not None:
                i = m.end()
                continue
        code, shift = _char_code(text[i], where)
        press(*((KEY_LEFTSHIFT, code) if shift else (code,)))
        i += 1
    return actions


def sleep_interruptibly(seconds: float) -> None:
    """Sleep, but stop at once on Ctrl-C or SIGTERM (while the runner forwards signals)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check_interrupted()
        time.sleep(min(left, 0.2))
    check_interrupted()


def send_boot_command(dom: Any, actions: Iterable[Action], key_interval: float = 0.1,
                      hold_ms: int = 50,
                      sleep: Callable[[float], None] = sleep_interruptibly) -> int:
    """Type the actions into the domain's keyboard; how many chords were sent. key_interval
    is Packer's boot_key_interval (100 ms by default in its qemu builder)."""
    libvirt = lv.libvirt_module()
    sent = 0
    for action in actions:
        if isinstance(action, Wait):
            sleep(action.seconds)
            continue
        try:
            dom.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, hold_ms, list(action.codes),
                        len(action.codes), 0)
        except libvirt.libvirtError as e:
            raise BuildError(f"domain {dom.name()}: typing the boot command failed: "
                             f"{lv.error_text(e)}") from None
        sent += 1
        sleep(key_interval)
    return sent


# --- the guest's address ---------------------------------------------------------------------

ADDRESS_SOURCES = {"lease": "VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE",
                   "arp": "VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP",
                   "agent": "VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT"}
_SOURCE_TEXT = {"lease": "its network's DHCP leases", "arp": "the hypervisor's ARP table",
                "agent": "the guest agent"}


def domain_ipv4(dom: Any, source: str = "lease") -> str | None:
    """The domain's first IPv4 address as the source reports it now, or None."""
    libvirt = lv.libvirt_module()
    try:
        flag = getattr(libvirt, ADDRESS_SOURCES[source])
    except KeyError:
        raise ConfigError(f"address_source: {source!r} is not one of "
                          f"{', '.join(ADDRESS_SOURCES)}") from None
    try:
        interfaces = dom.interfaceAddresses(flag, 0) or {}
    except libvirt.libvirtError as e:
        if source == "agent" and e.get_error_code() in (
                libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                libvirt.VIR_ERR_OPERATION_INVALID):
            return None  # the agent is not up yet: asked again
        # libvirt 9.0's ARP source fails for good here ("wrong nlmsg len"): say so now
        # rather than wait for a timeout.
        raise BuildError(f"domain {dom.name()}: cannot read its address from "
                         f"{_SOURCE_TEXT[source]}: {lv.error_text(e)}",
                         hint="set the site's address_source to lease or agent") from None
    for name in sorted(interfaces):
        if name == "lo":
            continue
        for addr in interfaces[name].get("addrs") or []:
            if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and addr.get("addr"):
                return str(addr["addr"])
    return None


def wait_for_address(dom: Any, source: str = "lease", timeout: float = 120.0,
                     poll: float = 0.5) -> str:
    """Poll until the domain has an IPv4 address; BuildError if it stops or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        addr = domain_ipv4(dom, source)
        if addr is not None:
            return addr
        if not dom.isActive():
            raise BuildError(f"domain {dom.name()} stopped before it got an address",
                             hint="see the domain's serial log")
        if time.monotonic() >= deadline:
            raise BuildError(f"domain {dom.name()}: no IPv4 address from "
                             f"{_SOURCE_TEXT[source]} within {timeout:.0f} s",
                             hint="the guest's network did not come up: check that it runs a "
                                  "DHCP client and that the network serves DHCP (or set the "
                                  "site's address_source); see the domain's serial log")
        sleep_interruptibly(min(poll, max(0.0, deadline - time.monotonic())))


# --- volumes and domain ----------------------------------------------------------------------


def create_overlay(conn: Any, pool: str, name: str, backing: Any, capacity: int = 0) -> Any:
    """A qcow2 volume in pool whose reads fall through to backing (a volume of the same
    hypervisor) until written: the source stays untouched, the build writes only its delta.
    Its virtual size is the backing's, or capacity when that is larger."""
    with contextlib.suppress(Exception):
        backing.storagePoolLookupByVolume().refresh(0)  # an upload leaves a stale capacity
    _kind, backing_capacity, _alloc = backing.info()
    fmt = ET.fromstring(backing.XMLDesc(0)).find("target/format")  # noqa: S314 - libvirt's
    backing_fmt = fmt.get("type", "raw") if fmt is not None else "raw"
    xml = (f"<volume><name>{escape(name)}</name>"
           f"<capacity unit='bytes'>{max(capacity, int(backing_capacity))}</capacity>"
           f"<target><format type='qcow2'/></target>"
           f"<backingStore><path>{escape(backing.path())}</path>"
           f"<format type={quoteattr(backing_fmt)}/></backingStore></volume>")
    return conn.storagePoolLookupByName(pool).createXML(xml, 0)


@dataclass(frozen=True)
class DomainSpec:
    """What the build's domain is made of. Paths (kernel, initrd, serial_log) are on the
    hypervisor."""

    name: str
    run: str  # the build's run id (a uuid4): the tag's key
    image: str
    pool: str
    network: str
    disk: str  # the build's volume in pool (the overlay), booted from
    volumes: tuple[str, ...] = ()  # every volume the build made (the tag lists them)
    memory_mib: int = 1024
    cpus: int = 1
    accelerator: str = "tcg"  # kvm or tcg
    authorized_key: str | None = None  # the build's public key line
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    cdroms: tuple[str, ...] = ()  # volumes of pool attached as CD-ROMs
    on_reboot: str = "restart"
    serial_log: str | None = None
    extra_devices: str = field(default="", repr=False)

    @property
    def tag(self) -> BuildTag:
        """What `./build.py clean` selects the build's domain and volumes by (clean.py)."""
        return BuildTag(run=self.run, image=self.image, pool=self.pool, domain=self.name,
                        volumes=self.volumes)


def domain_xml(spec: DomainSpec) -> str:
    """The domain (its NIC without a boot ROM: a guest that boots nothing must not get an
    address by PXE): <domain type='kvm'> or, under TCG, type='qemu'; ACPI on (the power button
    is how it is asked to stop); the build's public key by fw_cfg; an installer's own kernel
    and initrd booted directly when given (its command line carries inst.ks= and the like)."""
    if spec.accelerator not in ("kvm", "tcg"):
        raise ConfigError(f"accelerator: {spec.accelerator!r} is not kvm or tcg")
    dtype = "kvm" if spec.accelerator == "kvm" else "qemu"
    boot = ""
    if spec.kernel:
        boot = (f"<kernel>{escape(spec.kernel)}</kernel>"
                + (f"<initrd>{escape(spec.initrd)}</initrd>" if spec.initrd else "")
                + f"<cmdline>{escape(spec.cmdline or '')}</cmdline>")
    else:
        boot = "<boot dev='hd'/><boot dev='cdrom'/>"
    fwcfg = (f"<sysinfo type='fwcfg'><entry name='{FW_CFG_KEY}'>"
             f"{escape(spec.authorized_key.strip())}</entry></sysinfo>"
             if spec.authorized_key else "")
    disks = (f"<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
             f"<source pool={quoteattr(spec.pool)} volume={quoteattr(spec.disk)}/>"
             f"<target dev='vda' bus='virtio'/></disk>")
    for i, cd in enumerate(spec.cdroms):
        disks += (f"<disk type='volume' device='cdrom'><driver name='qemu' type='raw'/>"
                  f"<source pool={quoteattr(spec.pool)} volume={quoteattr(cd)}/>"
                  f"<target dev='sd{chr(97 + i)}' bus='sata'/><readonly/></disk>")
    log = f"<log file={quoteattr(spec.serial_log)}/>" if spec.serial_log else ""
    return (f"<domain type='{dtype}'><name>{escape(spec.name)}</name>"
            f"<metadata>{spec.tag.metadata_xml(namespaced=True)}</metadata>"
            f"<memory unit='MiB'>{spec.memory_mib}</memory><vcpu>{spec.cpus}</vcpu>{fwcfg}"
            f"<os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>"
            f"<features><acpi/><apic/></features>"
            f"<on_poweroff>destroy</on_poweroff><on_reboot>{escape(spec.on_reboot)}"
            f"</on_reboot><on_crash>destroy</on_crash>"
            f"<devices>{disks}"
            f"<interface type='network'><source network={quoteattr(spec.network)}/>"
            f"<model type='virtio'/><rom enabled='no'/></interface>"
            f"<serial type='pty'>{log}<target port='0'/></serial>"
            f"<console type='pty'><target type='serial' port='0'/></console>"
            f"<graphics type='vnc' listen='127.0.0.1' autoport='yes'/>"
            # no USB controller (its frame timer costs a TCG guest CPU; keys go by PS/2) and
            # no balloon: a build VM needs neither
            f"<controller type='usb' model='none'/><memballoon model='none'/>"
            f"{spec.extra_devices}</devices></domain>")


# --- stopping --------------------------------------------------------------------------------


def wait_shut_off(dom: Any, timeout: float) -> bool:
    """True once the domain is no longer running (or gone), False when the time is up."""
    libvirt = lv.libvirt_module()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not dom.isActive():
                return True
        except libvirt.libvirtError as e:
            if lv.is_no_such(e):
                return True
            raise
        if time.monotonic() >= deadline:
            return False
        sleep_interruptibly(min(0.25, max(0.0, deadline - time.monotonic())))


def shutdown(dom: Any, acpi_timeout: float = 60.0) -> str:
    """Stop the domain: the ACPI power button, then destroy once acpi_timeout has passed.
    What stopped it: 'off' (it was not running), 'acpi' or 'destroyed'."""
    libvirt = lv.libvirt_module()
    if wait_shut_off(dom, 0):
        return "off"
    with contextlib.suppress(libvirt.libvirtError):  # a guest still booting may refuse it
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    if wait_shut_off(dom, acpi_timeout):
        return "acpi"
    with contextlib.suppress(libvirt.libvirtError):  # it may stop on its own meanwhile
        dom.destroy()
    if not wait_shut_off(dom, 30):
        raise BuildError(f"domain {dom.name()} is still running after destroy")
    return "destroyed"


def remove_domain(dom: Any) -> None:
    """Destroy and undefine, whatever state it is in; quiet if it is gone already."""
    libvirt = lv.libvirt_module()
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


class BuildDomain:
    """The build's overlay and domain, removed again on leaving (also on errors and Ctrl-C),
    unless keep is set then (--keep-failed). Times of each phase are in .timings; on_defined
    is called between the domain's definition and its start."""

    def __init__(self, conn: Any, spec: DomainSpec, source: Any, capacity: int = 0,
                 on_defined: Callable[[], None] | None = None) -> None:
        self.conn, self.spec, self.source, self.capacity = conn, spec, source, capacity
        self.on_defined = on_defined
        self.dom: Any = None
        self.overlay: Any = None
        self.keep = False
        self.timings: dict[str, float] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        libvirt = lv.libvirt_module()
        with self._stack as stack:
            t0 = time.monotonic()
            try:
                self.overlay = create_overlay(self.conn, self.spec.pool, self.spec.disk,
                                              self.source, self.capacity)
                stack.callback(self._remove_overlay)
                self.timings["overlay"] = time.monotonic() - t0
                t0 = time.monotonic()
                self.dom = self.conn.defineXML(domain_xml(self.spec))
                stack.callback(self._remove_domain)
                self.timings["define"] = time.monotonic() - t0
                if self.on_defined is not None:
                    self.on_defined()
                check_interrupted()
                t0 = time.monotonic()
                self.dom.create()
                self.timings["start"] = time.monotonic() - t0
            except libvirt.libvirtError as e:
                raise BuildError(f"domain {self.spec.name}: {lv.error_text(e)}") from None
            self._stack = stack.pop_all()
        return self

    def _remove_domain(self) -> None:
        if not self.keep and self.dom is not None:
            remove_domain(self.dom)

    def _remove_overlay(self) -> None:
        if not self.keep and self.overlay is not None:
            with contextlib.suppress(Exception):
                self.overlay.delete(0)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()
