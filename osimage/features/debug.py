"""Interactive builds: --debug (Packer's -debug and -on-error=ask) and --break-before/after.

A person steps through the build on a terminal, logs in to the VM with the command printed
here, and decides what happens on an error. Such a build is never published nor recorded: its
version carries -debug and its artifacts stay in build/IMAGE/VERSION/output/.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from osimage.config import Image
from osimage.errors import ConfigError
from osimage.runner import say

_SSH_PORT = re.compile(r"Found port for communicator \(SSH, WinRM, etc\): (\d+)")
_VNC = re.compile(r"vnc://(127\.0\.0\.1|[\d.]+):(\d+)|VNC \((127\.0\.0\.1|[\d.]+):(\d+)\)")
_VM_UP = ("Waiting for SSH to become available", "Connected to SSH")


def check_options(image: Image, debug: bool, break_before: Sequence[str],
                  break_after: Sequence[str], has_terminal: bool | None = None) -> None:
    """Refuse what cannot work before anything starts (exit 2)."""
    shown = f"images/{image.name}/image.yaml"
    for flag, names in (("--break-before", break_before), ("--break-after", break_after)):
        for name in names:
            if name not in image.provisioner_names:
                near = difflib.get_close_matches(name, image.provisioner_names, n=1)
                hint = (f"did you mean '{near[0]}'?" if near else
                        f"the steps are: {', '.join(image.provisioner_names)}")
                raise ConfigError(f"{flag} {name}: {shown} has no provisioner named "
                                  f"'{name}' ({hint})")
    if not (debug or break_before or break_after):
        return
    if has_terminal is None:
        has_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if not has_terminal:
        what = "--debug" if debug else "--break-before/--break-after"
        raise ConfigError(f"{what} needs a terminal: Packer pauses and asks on it, and there "
                          "is none here (stdin or stdout is not a TTY)",
                          hint="run it from an interactive shell; in CI, build without it")


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
            say("\n".join(["", *self.text(), ""]))

    def text(self) -> list[str]:
        port = f" -p {self.ssh_port}" if self.ssh_port else ""
        out = ["==> osimage: the VM is up; to log in:",
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
