#!/usr/bin/env python3
"""Stands in for Packer 1.14 with the libvirt plugin, which cannot be installed here.

The wrapper's libvirt backend is tested end to end against a real libvirtd; only Packer and
its plugin are played by this script, with libvirt-python, the way the plugin (v0.5.0) uses
libvirt: it reads the rendered HCL, makes the volumes (a clone of the source volume, the
OEMDRV CD from the files volume, an empty target disk), defines and starts a TCG domain
named domain_name, and then FAILS the way the plugin can: it only injects failures, it never
pretends a build worked (the wrapper's download, conversion and publishing of a real artifact
volume are tested directly against libvirtd in tests/test_libvirt.py).

    packer version                   Packer v1.14.0
    packer plugins installed         the plugin's path, as Packer 1.14 lists it
    packer validate FILE             exit 0
    packer build -machine-readable FILE

FAKE_PACKER_MODE=fail leaves the running domain and its volumes behind and exits 1, as a
failed build of the plugin can; FAKE_PACKER_MODE=hang waits, with the domain running, until
a signal, then exits without cleaning up; FAKE_PACKER_MODE=no-plugin lists no plugin.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def say(target: str, kind: str, *data: str) -> None:
    fields = [d.replace(",", "%!(PACKER_COMMA)").replace("\n", "\\n") for d in data]
    print(",".join([str(int(time.time())), target, kind, *fields]), flush=True)


def blocks(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def build(hcl_file: Path) -> int:
    import hcl2
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    options = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False,
                                        with_comments=False)
    parsed = hcl2.loads(hcl_file.read_text(), serialization_options=options)
    name, src = next(iter(parsed["source"][0]["libvirt"].items()))
    target = f"libvirt.{name}"
    conn = libvirt.open(src["libvirt_uri"])
    domain = src["domain_name"]
    say("", "ui", "say", f"==> {target}: Preparing volumes...")
    disks = []
    made = []
    for vol in blocks(src["volume"]):
        pool = conn.storagePoolLookupByName(vol["pool"])
        sources = blocks(vol.get("source"))
        source = sources[0] if sources else {}
        kind = source.get("type")
        if kind == "cloning":
            base = conn.storagePoolLookupByName(source["pool"]).storageVolLookupByName(
                source["volume"])
            xml = (f"<volume><name>{vol['name']}</name><capacity>0</capacity>"
                   f"<target><format type='qcow2'/></target></volume>")
            v = pool.createXMLFrom(xml, base, 0)
            made.append(v)
            fmt = "qcow2"
        elif kind == "files":
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp) / "cd"
                root.mkdir()
                for f in source.get("files", []):
                    subprocess.run(["cp", "-r", f, str(root)], check=True)
                for rel, text in source.get("contents", {}).items():
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_text(text)
                iso = Path(tmp) / "cd.iso"
                subprocess.run(["xorriso", "-as", "genisoimage", "-rock", "-joliet", "-volid",
                                source["label"], "-output", str(iso), str(root)], check=True,
                               capture_output=True)
                cd = iso.read_bytes()
            v = pool.createXML(f"<volume><name>{vol['name']}</name><capacity>{len(cd)}"
                               f"</capacity><target><format type='raw'/></target></volume>", 0)
            stream = conn.newStream(0)
            v.upload(stream, 0, len(cd), 0)
            stream.sendAll(lambda _s, n, buf: buf.read(n), io.BytesIO(cd))
            stream.finish()
            made.append(v)
            fmt = "raw"
        elif vol.get("alias") == "artifact":
            cap = vol["capacity"]
            v = pool.createXML(f"<volume><name>{vol['name']}</name><capacity unit='"
                               f"{cap[-1]}'>{cap[:-1]}</capacity><allocation>0</allocation>"
                               f"<target><format type='{vol['format']}'/></target></volume>", 0)
            made.append(v)
            fmt = vol["format"]
        else:  # must exist, as with the plugin
            try:
                v = pool.storageVolLookupByName(vol["name"])
            except libvirt.libvirtError as e:
                say("", "ui", "error", f"Build '{target}' errored: volume {vol['name']}: {e}")
                return 1
            fmt = "raw"
        device = vol.get("device", "disk")
        disks.append((device, vol["pool"], vol["name"], fmt))
    devs = "".join(
        f"<disk type='volume' device='{dev}'><driver name='qemu' type='{fmt}'/>"
        f"<source pool='{pool}' volume='{vol}'/><target dev='sd{chr(97 + i)}' bus='sata'/>"
        f"{'<readonly/>' if dev == 'cdrom' else ''}</disk>"
        for i, (dev, pool, vol, fmt) in enumerate(disks))
    nic = blocks(src["network_interface"])[0]
    iface = (f"<interface type='network'><source network='{nic['network']}'/></interface>"
             if nic["type"] == "managed" else
             f"<interface type='bridge'><source bridge='{nic['bridge']}'/></interface>")
    xml = (f"<domain type='{src.get('domain_type', 'kvm')}'><name>{domain}</name>"
           f"<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type>"
           f"</os><devices>{devs}{iface}</devices></domain>")
    say("", "ui", "say", f"==> {target}: Sending the domain definition to libvirt")
    dom = conn.defineXML(xml)
    dom.create()
    say("", "ui", "say", f"==> {target}: Starting the domain")
    mode = os.environ.get("FAKE_PACKER_MODE", "")
    if mode == "fail":
        say("", "ui", "error", f"Build '{target}' errored after 1 second: Timeout waiting "
            f"for SSH.")
        return 1
    if mode == "hang":
        signal.signal(signal.SIGINT, lambda *_: sys.exit(1))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
        say("", "ui", "say", f"==> {target}: Waiting for SSH to become available...")
        while True:
            time.sleep(0.1)
    # Never a successful build: a stand-in may inject a failure, not pretend Packer worked.
    say("", "ui", "error", f"Build '{target}' errored: fake packer injects failures only "
        "(FAKE_PACKER_MODE=fail or hang)")
    return 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["version"]:
        print("Packer v1.14.0")
        return 0
    if argv[:2] == ["plugins", "installed"]:
        if os.environ.get("FAKE_PACKER_MODE") == "no-plugin":
            return 0
        print("/root/.config/packer/plugins/github.com/thomasklein94/libvirt/"
              "packer-plugin-libvirt_v0.5.0_x5.0_linux_amd64")
        return 0
    if argv[:1] == ["validate"]:
        return 0
    if argv[:1] == ["build"]:
        return build(Path(argv[-1]))
    print(f"fake packer: unknown command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
