"""Running Packer: version check, validate, and build with progress from -machine-readable."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from osimage import runner
from osimage.errors import BuildError, ConfigError
from osimage.fsutil import atomic_write_text

MIN_VERSION = (1, 6, 6)


@dataclass
class MachineLine:
    timestamp: str
    target: str
    kind: str
    data: list[str]


def parse_machine_line(line: str) -> MachineLine | None:
    """One line of `packer -machine-readable`: timestamp,target,type,data... (commas in data are
    written %!(PACKER_COMMA), newlines as a literal \\n)."""
    parts = line.split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    data = [p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
            for p in parts[3:]]
    return MachineLine(parts[0], parts[1], parts[2], data)


def version(binary: str) -> tuple[int, int, int]:
    out = runner.output([binary, "version"], what="packer version")
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise BuildError(f"{binary} version: cannot read a version from {out.strip()!r}")
    return (int(m[1]), int(m[2]), int(m[3]))


def _cached_version(binary: str) -> tuple[int, int, int]:
    """packer version, remembered per binary (path, size, mtime): it costs a process start."""
    from osimage.build.accel import cache_home

    path = shutil.which(binary)
    if path is None:
        raise BuildError(f"{binary}: command not found")
    st = os.stat(path)
    key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    cache = cache_home() / "packer-version.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(cache.read_text())
        if data["key"] == key:
            major, minor, patch = data["version"]
            return (int(major), int(minor), int(patch))
    found = version(binary)
    with contextlib.suppress(OSError):  # whole or not at all: another build may read it now
        atomic_write_text(cache, json.dumps({"key": key, "version": list(found)}))
    return found


def check_version(binary: str) -> tuple[int, int, int]:
    try:
        found = _cached_version(binary)
    except BuildError as e:
        raise ConfigError(f"packer.binary: {binary!r} cannot be run ({e.message})",
                          hint="apt-get install -y packer, or set packer.binary in the site "
                               "file") from None
    if found < MIN_VERSION:
        raise ConfigError(f"packer {'.'.join(map(str, found))} is too old; "
                          f"{'.'.join(map(str, MIN_VERSION))} or newer is needed")
    return found


def validate(binary: str, hcl_file: Path, cwd: Path) -> None:
    proc = runner.run([binary, "validate", hcl_file.name], cwd=cwd, check=False)
    if not proc.ok:
        text = " ".join(line.strip() for line in proc.tail if line.strip())
        raise BuildError(f"{hcl_file}: packer validate failed: {text[:400]}",
                         hint="this is a bug in templates/ or image.yaml; "
                              "'./build.py render IMAGE' renders without building")


@dataclass
class BuildProgress:
    """Turns machine-readable lines into packer.log text, the current step and artifacts."""

    log: IO[str]
    on_step: Any = None  # Callable[[str], None]
    errors: list[str] = field(default_factory=list)
    artifact_id: str = ""
    text_tail: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        parsed = parse_machine_line(line)
        if parsed is None:
            self._text(line)
            return
        if parsed.kind == "ui" and len(parsed.data) >= 2:
            level, text = parsed.data[0], parsed.data[1]
            for piece in text.splitlines() or [""]:
                self._text(piece)
            if level == "say" and text.lstrip().startswith("==>"):
                said = text.strip()[3:].strip()
                step = said.split(":", 1)[-1].strip() if ":" in said else said
                if (step and not step.startswith("Wait completed")
                        and self.on_step is not None):
                    self.on_step(step)
            if level == "error":
                self.errors.append(text.strip())
        elif parsed.kind == "artifact" and len(parsed.data) >= 3 and parsed.data[1] == "id":
            self.artifact_id = parsed.data[2]

    def _text(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()
        self.text_tail = [*self.text_tail, text][-40:]


# --- an interactive build: how to reach the VM ---------------------------------------------

_SSH_PORT = re.compile(r"Found port for communicator \(SSH, WinRM, etc\): (\d+)")
_VNC = re.compile(r"vnc://(127\.0\.0\.1|[\d.]+):(\d+)|VNC \((127\.0\.0\.1|[\d.]+):(\d+)\)")
_VM_UP = ("Waiting for SSH to become available", "Connected to SSH")


@dataclass
class LoginHints:
    """Reads Packer's output and, once the VM is up, prints how to log in to it."""

    user: str
    key_file: Path
    backend: str = "qemu"
    serial_socket: Path | None = None
    domain: str | None = None
    ssh_port: int | None = None
    vnc: str | None = None
    login: list[str] = field(default_factory=list)  # the backend's own login argv, if any
    shown: bool = False
    lines: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        if (m := _SSH_PORT.search(line)) is not None:
            self.ssh_port = int(m[1])
        if (m := _VNC.search(line)) is not None:
            host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
            self.vnc = f"{host}:{port}"
        if not self.shown and any(s in line for s in _VM_UP):
            self.shown = True
            runner.say("\n".join(["", *self.text(), ""]))

    def text(self) -> list[str]:
        port = f" -p {self.ssh_port}" if self.ssh_port else ""
        out = ["==> osimage: the VM is up; to log in:",
               f"    {shlex.join(self.login)}" if self.login else
               f"    ssh -i {self.key_file}{port} -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null {self.user}@127.0.0.1"]
        if self.backend == "libvirt" and self.domain:
            out.append(f"    virsh console {self.domain}      (domain {self.domain})")
        if self.vnc:
            host, port = self.vnc.rsplit(":", 1)
            out.append(f"    VNC display: vnc://{self.vnc} (vncviewer {host}::{port})")
        if self.serial_socket is not None:
            out.append(f"    serial console: socat -,raw,echo=0,escape=0x0f "
                       f"UNIX-CONNECT:{self.serial_socket} (Ctrl-O leaves)")
        return out
