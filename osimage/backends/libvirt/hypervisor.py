"""The libvirt hypervisor through libvirt-python: what the Packer plugin leaves to the wrapper.

The plugin (github.com/thomasklein94/libvirt) boots the build's domain and leaves the image as
a volume in a storage pool. Around it, this module connects to the hypervisor and handles its
volumes by name; preflight.py checks it before a build (named checks, each with a hint),
streams.py moves the bytes (the install source into the pool, the image out of it), clean.py
removes what builds leave behind. Every byte goes through libvirt streams, so a remote
hypervisor (qemu+ssh://) works the same as a local one: nothing reads or writes the
hypervisor's files directly.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit
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

def source_volume_name(image: str, sha256: str, suffix: str) -> str:
    """The pool volume of an install source: named by content, so a changed ISO is a new
    volume and an unchanged one is uploaded once for every build after."""
    return f"{SOURCE_PREFIX}{image}-{sha256[:16]}{suffix}"


def stamp_name(volume: str) -> str:
    return volume + ".sha256"


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




# --- reaching the guest through the hypervisor -----------------------------------------------

DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")  # OpenSSH's, in the order it tries them


@dataclass(frozen=True)
class SSHBastion:
    """The hypervisor of a qemu+ssh:// URI as the SSH bastion to its guests, with what libvirt
    itself logs in with: the URI's user, port and ?keyfile= (else ssh-agent, else OpenSSH's
    default keys), and its host key checked as libvirt's ssh checks it (known_hosts, unless
    the URI says no_verify=1)."""

    host: str
    port: int
    user: str
    key_file: str | None  # None: ssh-agent
    verify_host_key: bool

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh_argv(self) -> list[str]:
        """OpenSSH options to reach the bastion the way libvirt's transport does."""
        argv = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes",
                "-o", f"StrictHostKeyChecking={'yes' if self.verify_host_key else 'no'}"]
        if self.key_file:
            argv += ["-i", self.key_file, "-o", "IdentitiesOnly=yes"]
        return argv


def ssh_bastion(uri: str, where: str = "libvirt.uri") -> SSHBastion | None:
    """The bastion of a qemu+ssh:// URI; None for a local or non-SSH transport. where: how
    errors name the URI's setting."""
    parts = urlsplit(uri)
    if not parts.scheme.endswith("+ssh") or not parts.hostname:
        return None
    query = dict(parse_qsl(parts.query))
    shown = uri.split("?", 1)[0]
    try:
        port = parts.port or 22
    except ValueError:
        raise ConfigError(f"{where}: {shown}: the port is not a number") from None
    key = query.get("keyfile")
    if key is None and not os.environ.get("SSH_AUTH_SOCK"):
        home = Path("~/.ssh").expanduser()
        key = next((str(home / k) for k in DEFAULT_KEYS if (home / k).is_file()), None)
        if key is None:
            raise ConfigError(f"{where}: {shown}: no key to reach the hypervisor's guests "
                              f"through it: give ?keyfile=PATH, or run ssh-agent")
    return SSHBastion(host=parts.hostname, port=port,
                      user=unquote(parts.username) if parts.username else getpass.getuser(),
                      key_file=key, verify_host_key=query.get("no_verify", "0") != "1")
