"""A real libvirtd for tests and benchmarks, and throwaway pools, networks and domains in it.

Nothing here depends on pytest, so tests and bench/ share it:

    reason = ensure_libvirtd()            # None when qemu:///system answers (started if need be)
    with TestPool(URI, tmp / "pool", "osimage-t-1a2b3c") as pool, TestNetwork(URI) as net:
        ...                               # pool.conn, pool.name, pool.path; net.name

Without systemd the daemons are started by hand, as shared/ENVIRONMENT.md describes: first
`user = "root"` and `group = "root"` are appended to /etc/libvirt/qemu.conf (otherwise every
domain define takes 30-50 s here), then `virtlogd -d` and `libvirtd -d`. A daemon this module
started is stopped again by stop_started(), by the pid it wrote; one that was already running
is left alone. Pools and networks are transient (gone when destroyed), named per test run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
START_TIMEOUT = 15.0
_started: list[tuple[str, int]] = []  # (daemon, pid) this process started


def _quiet_libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _can_connect(uri: str) -> str | None:
    try:
        libvirt = _quiet_libvirt()
    except ImportError:
        return "the Python module libvirt is not installed (pip install libvirt-python)"
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        return str(e).strip()
    conn.close()
    return None


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _configure_qemu_conf() -> None:
    """Run domains as root: without it each define waits 30-50 s here (no systemd, no
    libvirt-qemu user session). Appended once; the shipped lines are only comments."""
    text = QEMU_CONF.read_text()
    lines = {line.strip() for line in text.splitlines()}
    if 'user = "root"' in lines and 'group = "root"' in lines:
        return
    with QEMU_CONF.open("a") as f:
        f.write('\n# osimage tests (no systemd): domains run as root\nuser = "root"\n'
                'group = "root"\n')


def ensure_libvirtd(uri: str = URI) -> str | None:
    """Make uri answer; None when it does, else the reason it cannot (for a skip message)."""
    if _can_connect(uri) is None:
        return None
    if uri != URI:
        return f"{uri} does not answer and is not a local daemon this helper can start"
    daemon = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    logd = shutil.which("virtlogd") or "/usr/sbin/virtlogd"
    if not Path(daemon).exists():
        return "libvirtd is not installed (apt-get install libvirt-daemon-system)"
    if os.geteuid() != 0:
        return "libvirtd is not running and only root can start the system daemon"
    _configure_qemu_conf()
    for name, binary, pidfile in (("virtlogd", logd, Path("/run/virtlogd.pid")),
                                  ("libvirtd", daemon, Path("/run/libvirtd.pid"))):
        if _pid_alive(pidfile) is not None:
            continue
        subprocess.run([binary, "-d"], check=False, capture_output=True, timeout=30)
        deadline = time.monotonic() + START_TIMEOUT
        while (pid := _pid_alive(pidfile)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is None:
            return f"{name} -d did not start (no live pid in {pidfile})"
        _started.append((name, pid))
    deadline = time.monotonic() + START_TIMEOUT
    while (reason := _can_connect(uri)) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return reason


def stop_started() -> None:
    """Stop the daemons ensure_libvirtd started (libvirtd first), by their pids."""
    while _started:
        _name, pid = _started.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class TestPool:
    """A transient directory pool in a folder of the test's own."""

    __test__ = False  # not a pytest test class

    def __init__(self, uri: str, path: Path, name: str | None = None) -> None:
        self.uri, self.path = uri, path
        self.name = name or unique("osimage-t-")
        self.conn: Any = None
        self.pool: Any = None

    def __enter__(self) -> Self:
        libvirt = _quiet_libvirt()
        self.path.mkdir(parents=True, exist_ok=True)
        self.conn = libvirt.open(self.uri)
        xml = (f"<pool type='dir'><name>{self.name}</name>"
               f"<target><path>{self.path}</path></target></pool>")
        self.pool = self.conn.storagePoolCreateXML(xml, 0)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A domain on this pool's volumes (a test that failed before its own cleanup) goes
        # with the pool.
        with contextlib.suppress(Exception):
            for dom in self.conn.listAllDomains(0):
                if f"pool='{self.name}'" in dom.XMLDesc(0):
                    with contextlib.suppress(Exception):
                        dom.destroy()
                    with contextlib.suppress(Exception):
                        dom.undefine()
        with contextlib.suppress(Exception):
            for vol in self.pool.listAllVolumes(0):
                vol.delete(0)
        with contextlib.suppress(Exception):
            self.pool.destroy()
        with contextlib.suppress(Exception):
            self.conn.close()


class TestNetwork:
    """A transient isolated network: a bridge of its own, no addresses, no dnsmasq."""

    __test__ = False

    def __init__(self, uri: str, name: str | None = None) -> None:
        self.uri = uri
        self.name = name or unique("osimage-t-")
        self.bridge = "osim" + uuid.uuid4().hex[:8]  # bridge names: 15 characters at most
        self.conn: Any = None
        self.net: Any = None

    def __enter__(self) -> Self:
        libvirt = _quiet_libvirt()
        self.conn = libvirt.open(self.uri)
        xml = (f"<network><name>{self.name}</name><bridge name='{self.bridge}' stp='off'/>"
               f"</network>")
        self.net = self.conn.networkCreateXML(xml)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):
            self.net.destroy()
        with contextlib.suppress(Exception):
            self.conn.close()


def define_domain(conn: Any, name: str, pool: str, volumes: list[str], start: bool = True,
                  network: str | None = None) -> Any:
    """A small TCG domain (<domain type='qemu'>) with the given pool volumes as its disks,
    defined like the plugin's; started when asked (it boots nothing: no bootable disk)."""
    disks = "".join(
        f"<disk type='volume' device='disk'><driver name='qemu' type='raw'/>"
        f"<source pool='{pool}' volume='{v}'/><target dev='vd{chr(97 + i)}' bus='virtio'/>"
        f"</disk>" for i, v in enumerate(volumes))
    iface = (f"<interface type='network'><source network='{network}'/>"
             f"<model type='virtio'/></interface>" if network else "")
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
           f"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
           f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}{iface}"
           f"<graphics type='vnc' listen='127.0.0.1' autoport='yes'/></devices></domain>")
    dom = conn.defineXML(xml)
    if start:
        dom.create()
    return dom


class SSHHypervisor:
    """The local libvirtd as a remote hypervisor: an OpenSSH sshd of its own on a free port
    of 127.0.0.1 (key login only), and the qemu+ssh:// URI that reaches libvirtd through it,
    as production reaches its hypervisor. libvirt runs the ssh client itself; on the far side
    virt-ssh-helper connects to the daemon."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return (f"qemu+ssh://root@127.0.0.1:{self.port}/system?keyfile={self.workdir}/id_client"
                f"&no_verify=1&no_tty=1")

    def __enter__(self) -> Self:
        import socket

        self.workdir.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "id_client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f",
                            str(self.workdir / key)], check=True)
        (self.workdir / "authorized_keys").write_text(
            (self.workdir / "id_client.pub").read_text())
        Path("/run/sshd").mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = self.workdir / "sshd_config"
        config.write_text(f"ListenAddress 127.0.0.1\nPort {self.port}\n"
                          f"HostKey {self.workdir}/host_key\nPidFile {self.workdir}/sshd.pid\n"
                          f"AuthorizedKeysFile {self.workdir}/authorized_keys\n"
                          "PasswordAuthentication no\nPermitRootLogin prohibit-password\n"
                          "StrictModes no\n")
        self._proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E",
                                       str(self.workdir / "sshd.log")])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on port {self.port}: "
                           f"{(self.workdir / 'sshd.log').read_text()}")

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        # The per-connection sshd processes end with their ssh client, that is with the
        # libvirt connection, which every test closes.
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
