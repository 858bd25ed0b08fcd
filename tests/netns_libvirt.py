"""A libvirtd of the test's own, in a network namespace of its own, with a NAT network and DHCP.

shared/ENVIRONMENT.md's recipe: private addresses only inside a namespace the test made, and a
daemon that shares nothing with the machine's own libvirtd (which other test runs use):

- `ip netns add osimage-t-XXXXXXXX`, lo up: the bridge, the guests' taps, dnsmasq and the NAT
  rules live there, so the guests' 10.x addresses never touch the machine's network;
- inside it, `unshare -m` (a private mount namespace) bind-mounts private copies over
  /etc/libvirt (qemu.conf with `user = "root"`, `group = "root"` appended, no domains, networks
  or pools of the machine's), /var/lib/libvirt, /run/libvirt, /var/cache/libvirt and
  /var/log/libvirt, then starts `virtlogd -d` and `libvirtd -d` with pid files of their own
  (the machine's /run/libvirtd.pid is left alone);
- the daemon's socket lands in the private /run/libvirt, which is a folder of the test's on the
  host: `qemu:///system?socket=DIR/run/libvirt-sock` reaches it from the test process (virsh
  and libvirt-python), without entering any namespace;
- a transient NAT network with DHCP on a random 10.x.y.0/24 and a transient directory pool.

Teardown (also after a failed start): every domain destroyed and undefined, the network and
pool destroyed, the daemons stopped by their pids, whatever process is still in the namespace
(dnsmasq, a qemu) killed by pid, the namespace deleted; the mount namespace ends with its last
process and the folder is removed. Nothing here depends on pytest but `netns_libvirt`, a
fixture (named netns_env, one per test module) that a test module imports:

    from tests.netns_libvirt import netns_libvirt  # noqa: F401  (the fixture)

    def test_x(netns_env: NetnsLibvirt) -> None:
        netns_env.uri, .network, .pool, .pool_path, .exec([...])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.libvirtd import _quiet_libvirt
from tests.servers import SSHD, SSHServer, free_port

START_TIMEOUT = 30.0
DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"
STOP_TIMEOUT = 10.0
# Private copies are bind-mounted over these (host path -> folder name in the test's dir).
PRIVATE_DIRS = {"/etc/libvirt": "etc", "/var/lib/libvirt": "lib", "/run/libvirt": "run",
                "/var/cache/libvirt": "cache", "/var/log/libvirt": "log"}
# What of /etc/libvirt is NOT copied: the machine's own domains, networks, pools and secrets.
_NOT_COPIED = {"qemu", "storage", "secrets"}


def missing_reason() -> str | None:
    """Why this machine cannot run a namespaced libvirtd (for a skip), or None."""
    if os.geteuid() != 0:
        return "a network namespace and a libvirtd of the test's own need root"
    for tool in ("ip", "unshare", "libvirtd", "virtlogd", "dnsmasq", "iptables"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    try:
        _quiet_libvirt()
    except ImportError:
        return "the Python module libvirt is not installed (pip install libvirt-python)"
    return None


def _pid_from(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class NetnsLibvirt:
    """A namespaced libvirtd with a NAT network (DHCP) and a directory pool; see the module."""

    def __init__(self, workdir: Path | None = None) -> None:
        tag = secrets.token_hex(4)
        self.name = f"osimage-t-{tag}"  # namespace, network and pool share it
        self.bridge = f"osimbr{tag}"  # 14 characters: a bridge name has 15 at most
        self.subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.gateway = f"{self.subnet}.1"
        self._own_workdir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.socket = self.dir / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.pool_path = self.dir / "pool"
        self.network = self.name
        self.pool = self.name
        self.conn: Any = None
        self._pidfiles = {"libvirtd": self.dir / "libvirtd.pid",
                          "virtlogd": self.dir / "virtlogd.pid"}
        self._netns_made = False
        self.timings: dict[str, float] = {}

    # --- running things inside ----------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the namespace (network only: the mounts are the machine's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        kwargs.setdefault("check", False)
        return subprocess.run(self.exec_argv(argv), **kwargs)

    def user_argv(self, argv: Sequence[str], ssh_dir: Path | None = None) -> list[str]:
        """argv run as a user on the hypervisor's network would: in the namespace, and with
        ssh_dir as root's ~/.ssh when given (in a mount namespace of its own: OpenSSH reads
        the home of the passwd entry, not $HOME; the machine's ~/.ssh is left alone)."""
        if ssh_dir is None:
            return self.exec_argv(argv)
        home = Path("~/.ssh").expanduser()
        home.mkdir(mode=0o700, exist_ok=True)  # a mount point must exist
        return self.exec_argv(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f'mount --bind "$0" {home} && exec "$@"', str(ssh_dir), *argv])

    def libvirtd_pid(self) -> int:
        pid = _pid_from(self._pidfiles["libvirtd"])
        assert pid is not None, "the namespaced libvirtd is not running"
        return pid

    def qemu_pids(self) -> list[int]:
        """The guests' qemu processes (all of them are in the namespace)."""
        found = []
        for pid in self.pids_inside():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                    found.append(pid)
        return found

    def add_network(self, dhcp: bool) -> str:
        """Another NAT network (without DHCP when dhcp is False); its name."""
        tag = secrets.token_hex(4)
        subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        served = (f"<dhcp><range start='{subnet}.100' end='{subnet}.199'/></dhcp>"
                  if dhcp else "")
        name = f"{self.name}-{tag}"
        self.conn.networkCreateXML(
            f"<network><name>{name}</name><forward mode='nat'/>"
            f"<bridge name='osimnd{tag}' stp='off' delay='0'/>"
            f"<ip address='{subnet}.1' netmask='255.255.255.0'>{served}</ip></network>")
        return name

    # --- setting up ---------------------------------------------------------------------------

    def _private_etc(self) -> None:
        etc = self.dir / "etc"
        etc.mkdir(mode=0o755)
        for entry in Path("/etc/libvirt").iterdir():
            if entry.name in _NOT_COPIED:
                continue
            if entry.is_dir():
                shutil.copytree(entry, etc / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, etc / entry.name)
        for sub in _NOT_COPIED:
            (etc / sub).mkdir(mode=0o700 if sub == "secrets" else 0o755)
        conf = etc / "qemu.conf"
        text = conf.read_text() if conf.exists() else ""
        lines = {line.strip() for line in text.splitlines()}
        if not {'user = "root"', 'group = "root"'} <= lines:
            # No systemd here: without it every domain define waits 30-50 s.
            conf.write_text(text + '\n# osimage tests: domains run as root\nuser = "root"\n'
                            'group = "root"\n')

    def _start_daemons(self) -> None:
        for host, sub in PRIVATE_DIRS.items():
            Path(host).mkdir(parents=True, exist_ok=True)  # a mount point must exist
            if sub == "cache" and Path(host).is_dir():
                # The machine's qemu capabilities cache: the daemon starts without probing qemu.
                # The machine's daemon may rewrite it meanwhile: then start without it.
                try:
                    shutil.copytree(host, self.dir / sub, symlinks=True)
                except (OSError, shutil.Error):
                    shutil.rmtree(self.dir / sub, ignore_errors=True)
                    (self.dir / sub).mkdir()
            elif sub != "etc":
                (self.dir / sub).mkdir()
        self._private_etc()
        mounts = "".join(f'mount --bind "$1/{sub}" {host} && '
                         for host, sub in PRIVATE_DIRS.items())
        script = (f"set -e; {mounts}"
                  'virtlogd -d -p "$1/virtlogd.pid" && libvirtd -d -p "$1/libvirtd.pid"')
        proc = self.exec(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                          "sh", str(self.dir)], timeout=START_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"starting the namespaced libvirtd failed: {proc.stderr.strip()}")
        libvirt = _quiet_libvirt()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.conn = libvirt.open(self.uri)
                return
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    log = self.dir / "log" / "libvirtd.log"
                    raise RuntimeError(f"{self.uri} did not answer: {e}; "
                                       f"{log.read_text()[-2000:] if log.exists() else ''}"
                                       ) from None
            time.sleep(0.1)

    def network_xml(self) -> str:
        # no-ping: dnsmasq otherwise pings each new address for 3 s before it offers it (every
        # build's guest is a new MAC), the one avoidable wait of a guest's boot here
        return (f"<network xmlns:dnsmasq='{DNSMASQ_NS}'><name>{self.network}</name>"
                f"<forward mode='nat'/><bridge name='{self.bridge}' stp='off' delay='0'/>"
                f"<ip address='{self.gateway}' netmask='255.255.255.0'><dhcp>"
                f"<range start='{self.subnet}.100' end='{self.subnet}.199'/></dhcp></ip>"
                f"<dnsmasq:options><dnsmasq:option value='no-ping'/></dnsmasq:options>"
                f"</network>")

    def __enter__(self) -> Self:
        try:
            t0 = time.monotonic()
            subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
            self._netns_made = True
            self.exec(["ip", "link", "set", "lo", "up"], check=True)
            self._start_daemons()
            self.timings["daemon start"] = time.monotonic() - t0
            t0 = time.monotonic()
            self.conn.networkCreateXML(self.network_xml())
            self.timings["network start"] = time.monotonic() - t0
            self.pool_path.mkdir()
            self.conn.storagePoolCreateXML(
                f"<pool type='dir'><name>{self.pool}</name>"
                f"<target><path>{self.pool_path}</path></target></pool>", 0)
        except BaseException:
            self.close()
            raise
        return self

    # --- tearing down -------------------------------------------------------------------------

    def _remove_libvirt_objects(self) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(Exception):
            for dom in self.conn.listAllDomains(0):
                with contextlib.suppress(Exception):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(Exception):
                    dom.undefine()
        with contextlib.suppress(Exception):
            for net in self.conn.listAllNetworks(0):
                with contextlib.suppress(Exception):
                    net.destroy()
                with contextlib.suppress(Exception):
                    net.undefine()
        with contextlib.suppress(Exception):
            for pool in self.conn.listAllStoragePools(0):
                with contextlib.suppress(Exception):
                    pool.destroy()
                with contextlib.suppress(Exception):
                    pool.undefine()
        with contextlib.suppress(Exception):
            self.conn.close()
        self.conn = None

    def _stop_daemons(self) -> None:
        for name in ("libvirtd", "virtlogd"):  # libvirtd first: it talks to virtlogd
            pid = _pid_from(self._pidfiles[name])
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, STOP_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, STOP_TIMEOUT)

    def pids_inside(self) -> list[int]:
        """Processes in the namespace (all of them started by this test: it made it)."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True,
                             check=False)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        self._remove_libvirt_objects()
        self._stop_daemons()
        if self._netns_made:
            for pid in self.pids_inside():  # a dnsmasq or qemu the daemon left
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in self.pids_inside():
                _wait_gone(pid, STOP_TIMEOUT)
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self._netns_made = False
        if self._own_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class HypervisorSSHD(SSHServer):
    """An OpenSSH sshd on the namespaced hypervisor, as production's qemu+ssh:// reaches its
    hypervisor: in libvirtd's network and mount namespaces (nsenter), so virt-ssh-helper
    finds the private daemon's socket, and the guests' NAT network is routable from it (it
    is the bastion). Key login as root; known_hosts trusts its host key."""

    def __init__(self, env: NetnsLibvirt) -> None:
        # DEBUG1: the log names each forwarded connection's target (the bastion's work)
        super().__init__(user="root", extra_config=("LogLevel DEBUG1",))
        self.env = env

    def uri(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"keyfile": str(self.client_key),
                                                  "no_tty": "1", **params}.items())
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system?{query}"

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        self.port = free_port()  # any: the namespace's 127.0.0.1 is its own
        config = self._write_config()
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["nsenter", "-t", str(self.env.libvirtd_pid()), "-m", "-n", SSHD, "-D", "-e",
                 "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while "Server listening on" not in self.log.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.known_hosts.write_text(f"{self.host_pattern} {self.host_public}\n")


@pytest.fixture(scope="module", name="netns_env")
def netns_libvirt() -> Iterator[NetnsLibvirt]:
    """A namespaced libvirtd with a NAT network and a pool, shared by a test module."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsLibvirt() as env:
        yield env
