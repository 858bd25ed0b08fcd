"""The libvirt backend's HCL: every image renders for the plugin, and the schema the render is
checked against matches the plugin's documented fields (no hypervisor needed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from osimage.backends.libvirt import steps as libvirt_steps
from osimage.build import hclschema
from osimage.errors import ConfigError
from tests.conftest import PROJECT, build_py
from tests.test_tidy import add_build

IMAGES = sorted(p.parent.name for p in (PROJECT / "images").glob("*/image.yaml"))

LIBVIRT_SITE = """\
backend: libvirt
libvirt:
  uri: qemu+ssh://root@kvm01.example/system
  pool: images
  network: builds
  driver: plugin
"""


def rendered(repo: Path, image: str, site: Path) -> Path:
    proc = build_py(repo, "render", image, "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    return repo / proc.stdout.strip()


@pytest.fixture
def lv_site(tmp_path: Path) -> Path:
    site = tmp_path / "libvirt-site.yaml"
    site.write_text(LIBVIRT_SITE)
    return site


@pytest.mark.parametrize("image", IMAGES)
def test_every_image_renders_for_both_backends(repo: Path, lv_site: Path, image: str,
                                               request: pytest.FixtureRequest) -> None:
    """The same image.yaml renders for qemu and for libvirt; the libvirt file parses and
    passes the plugin's schema, with nothing that needs the hypervisor at render time."""
    if image == "debian-base":  # its source disk, made once per session (mmdebstrap)
        repo = request.getfixturevalue("debian_repo")
    parent = YAML(typ="safe").load((repo / "images" / image / "image.yaml").read_text()).get(
        "parent")
    if parent is not None:  # a layer renders from its parent's recorded build (a small disk)
        disk = repo / "parent.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
        add_build(repo, parent, "1.0", mirror=repo / "mirror", content=disk.read_bytes())
    proc = build_py(repo, "render", image)
    assert proc.returncode == 0, proc.stderr
    qemu_hcl = repo / proc.stdout.strip()
    assert 'source "qemu"' in qemu_hcl.read_text()
    hcl = rendered(repo, image, lv_site)
    text = hcl.read_text()
    parsed = hclschema.check_text(text, str(hcl))
    plugin = parsed["packer"][0]["required_plugins"][0]["libvirt"]
    assert plugin == {"version": "= 0.5.0", "source": "github.com/thomasklein94/libvirt"}
    src = parsed["source"][0]["libvirt"][image]
    assert src["libvirt_uri"] == "qemu+ssh://root@kvm01.example/system"
    assert src["domain_name"].startswith(f"packer-osimage-{image}-")
    nic = src["network_interface"][0]
    assert (nic["type"], nic["network"], nic["alias"]) == ("managed", "builds", "communicator")
    volumes = src["volume"]
    assert all(v["pool"] == "images" for v in volumes)
    artifact = [v for v in volumes if v.get("alias") == "artifact"]
    assert len(artifact) == 1 and artifact[0]["name"].startswith(src["domain_name"] + "-")
    oemdrv = next(v for v in volumes if v.get("alias") == "oemdrv")
    cd = oemdrv["source"][0]
    assert cd["type"] == "files" and cd["label"] == "OEMDRV" and oemdrv["device"] == "cdrom"
    assert cd["contents"]["osimage/authorized_keys"].startswith("ssh-ed25519 ")
    assert src["communicator"][0]["communicator"] == "ssh"
    assert ".HTTPIP" not in text and "HTTPPort" not in text
    assert parsed["build"][0]["sources"] == [f"source.libvirt.{image}"]


def test_iso_image_renders_cdrom_and_kickstart_cd(repo: Path, lv_site: Path) -> None:
    """An installer image: the uploaded ISO as a read-only cdrom, the http_directory on the
    OEMDRV CD, boot_command pointing at it, an empty sparse target disk, hd then cdrom."""
    image = repo / "images" / "isotest"
    (image / "http").mkdir(parents=True)
    (image / "http" / "ks.cfg").write_text("text\nreboot\n")
    (image / "iso").mkdir()
    iso = image / "iso" / "install.iso"
    iso.write_bytes(b"not really an ISO" * 100)
    import hashlib

    sha = hashlib.sha256(iso.read_bytes()).hexdigest()
    (image / "image.yaml").write_text(f"""\
source:
  iso: images/isotest/iso/install.iso
  checksum: sha256:{sha}
disk_size: 20G
memory: 2048
cpus: 2
boot_command: ["<tab> inst.ks=http://{{{{ .HTTPIP }}}}:{{{{ .HTTPPort }}}}/ks.cfg<enter>"]
http_directory: http
provisioners:
  - {{name: hello, type: shell, inline: ["true"]}}
outputs:
  disk: {{format: qcow2, compression: zstd}}
""")
    hcl = rendered(repo, "isotest", lv_site)
    src = hclschema.check_text(hcl.read_text(), str(hcl))["source"][0]["libvirt"]["isotest"]
    cdrom, oemdrv, disk = src["volume"]
    assert cdrom == {"pool": "images", "name": f"osimage-src-isotest-{sha[:16]}.iso",
                     "capacity": f"{iso.stat().st_size}B", "device": "cdrom", "bus": "sata",
                     "readonly": True, "__is_block__": True}
    assert oemdrv["source"][0]["files"] == [str(image / "http" / "ks.cfg")]
    assert (disk["capacity"], disk["format"], disk["size"]) == ("20G", "qcow2", "1M")
    assert "source" not in disk
    assert src["boot_devices"] == ["hd", "cdrom"]
    assert src["boot_command"] == ["<tab> inst.ks=hd:LABEL=OEMDRV:/ks.cfg<enter>"]
    assert (src["memory"], src["vcpu"]) == (2048, 2)


def test_unknown_field_fails_render_with_exit_2(repo: Path, lv_site: Path) -> None:
    """A field the plugin does not know fails at render time, not after a boot."""
    template = repo / "templates" / "libvirt.pkr.hcl.j2"
    template.write_text(template.read_text().replace(
        "  vcpu        = {{ cpus | hcl }}\n",
        "  vcpu        = {{ cpus | hcl }}\n  memroy      = 1\n  disk_size   = \"1G\"\n"))
    proc = build_py(repo, "render", "smoke", "--site", str(lv_site))
    assert proc.returncode == 2, proc.stderr
    first = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "smoke.pkr.hcl: source.libvirt.smoke.disk_size: unknown field 'disk_size'" in first
    assert "(and 1 more problem)" in first
    assert "source.libvirt.smoke.memroy: unknown field 'memroy' (did you mean 'memory'?)" \
        in proc.stderr
    assert "thomasklein94/libvirt 0.5.0" in proc.stderr
    assert "Traceback" not in proc.stderr


BASE = """
packer {
  required_plugins {
    libvirt = { version = "= 0.5.0", source = "github.com/thomasklein94/libvirt" }
  }
}
source "libvirt" "x" {
  libvirt_uri = "qemu:///system"
  network_interface {
    type = "managed"
  }
  volume {
    alias    = "artifact"
    pool     = "default"
    capacity = "1G"
  }
  communicator {
    communicator = "ssh"
  }
BODY
}
"""


@pytest.mark.parametrize(("body", "message"), [
    ('  shutdown_mode = "acpii"',
     "source.libvirt.x.shutdown_mode: 'acpii' is not one of 'auto', 'acpi', 'guest', 'initctl', "
     "'signal', 'paravirt' (did you mean 'acpi'?)"),
    ('  memory = "lots"', "source.libvirt.x.memory: must be a number, not a string"),
    ("  graphics = { type = \"vnc\" }",
     "source.libvirt.x.graphics: must be written as a block, not as an attribute"),
    ('  volume {\n    name = "a"\n    pool = "p"\n  }',
     "source.libvirt.x.volume[1]: needs 'capacity' or 'size'"),
    ('  volume {\n    capacity = "1 G"\n  }',
     "source.libvirt.x.volume[1].capacity: '1 G' is not valid: a number with a unit"),
    ('  volume {\n    source {\n      type = "files"\n      lable = "OEMDRV"\n    }\n  }',
     "source.libvirt.x.volume[1].source.lable: unknown field 'lable' (did you mean 'label'?)"),
    ('  volume {\n    source {\n      type = "cloning"\n    }\n  }',
     "source.libvirt.x.volume[1].source: a cloning source needs 'pool' and 'volume'"),
    ('  artifact_volume_alias = "disk"',
     "source.libvirt.x.artifact_volume_alias: no volume has alias 'disk'"),
    ('  communicator {\n    ssh_username = "root"\n  }',
     "source.libvirt.x.communicator: at most 1 block of this kind, not 2"),
    ('  boot_wait = "5 seconds"', "source.libvirt.x.boot_wait: '5 seconds' is not valid"),
])
def test_schema_errors_name_the_field(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        hclschema.check_text(BASE.replace("BODY", body), "x.pkr.hcl")
    assert info.value.exit_code == 2
    assert f"x.pkr.hcl: {message}" in info.value.message


def test_schema_accepts_the_documented_examples() -> None:
    """Blocks as the plugin's docs write them (docs/builders/libvirt.mdx), in one source."""
    body = """
  vcpu = 1
  memory = 846
  network_address_source = "lease"
  shutdown_mode = "acpi"
  graphics {
    type = "vnc"
    port = 0
  }
  network_interface {
    type   = "bridge"
    bridge = "br0"
  }
  volume {
    bus  = "sata"
    pool = "default"
    name = "custom-image"
    source {
      type   = "backing-store"
      pool   = "base-images"
      volume = "ubuntu-22.04-lts"
    }
    capacity = "20G"
  }
  volume {
    source {
      type     = "external"
      urls     = ["https://example.invalid/ubuntu.img"]
      checksum = "2a0d8745dee674a7f3038d627d39ff68e5d7276f97866a4abd9ebfcb3df5fa05"
    }
  }
  volume {
    device = "floppy"
    source {
      type     = "files"
      label    = "unattend"
      contents = { "Unattend.xml" = "<xml/>" }
    }
  }
  volume {
    source {
      type      = "cloud-init"
      user_data = "#cloud-config"
    }
  }"""
    hclschema.check_text(BASE.replace("BODY", body), "docs.pkr.hcl")


# The plugin's documented fields (v0.5.0): docs/builders/libvirt.mdx and the docs-partials it
# includes (Config-required/-not-required, network/NetworkInterface-*, volume/Volume-not-
# required, volume/*VolumeSource-not-required, VolumeSource-required, DomainGraphic-required,
# SdlDomainGraphic-/VNCDomainGraphic-not-required), written down by hand from those pages.
DOCUMENTED: dict[str, set[str]] = {
    "Config": {"libvirt_uri", "communicator", "domain_name", "memory", "vcpu", "cpu_mode",
               "network_interface", "communicator_interface", "volume",
               "artifact_volume_alias", "boot_devices", "graphics", "network_address_source",
               "shutdown_mode", "shutdown_timeout", "domain_type", "arch", "chipset",
               "loader_path", "loader_type", "secure_boot", "nvram_path", "nvram_template"},
    "NetworkInterface": {"type", "mac", "alias", "model"},
    "Volume": {"pool", "name", "source", "size", "capacity", "readonly", "target_dev", "bus",
               "alias", "format", "device"},
    "VolumeSource": {"type", "pool", "volume", "path", "meta_data", "user_data",
                     "network_config", "checksum", "urls", "files", "contents", "label"},
    "DomainGraphic": {"type", "display", "port"},
}
# In the generated *.hcl2spec.go (what Packer really decodes) but not in the field lists of
# the docs: Packer's own common fields, the boot command fields of the SDK's BootConfig (the
# plugin embeds it), and the two network fields the docs show only in their examples.
UNDOCUMENTED: dict[str, set[str]] = {
    "Config": {"packer_build_name", "packer_builder_type", "packer_core_version",
               "packer_debug", "packer_force", "packer_on_error", "packer_user_variables",
               "packer_sensitive_variables", "boot_keygroup_interval", "boot_wait",
               "boot_command", "key_hold_time"},
    "NetworkInterface": {"bridge", "network"},
}


@pytest.mark.parametrize("block", sorted(DOCUMENTED))
def test_schema_matches_the_plugin_docs(block: str) -> None:
    schema = hclschema.load()
    fields = set(schema["$defs"][block]["properties"]) - {hclschema.BLOCK}
    assert fields - DOCUMENTED[block] == UNDOCUMENTED.get(block, set())
    assert DOCUMENTED[block] <= fields


def test_schema_names_its_plugin_version_and_sources() -> None:
    schema = hclschema.load()
    assert schema["x-plugin"]["version"] == "0.5.0"
    for name in ("generate.hcl2spec.go", "network/generate.hcl2spec.go",
                 "volume/generate.hcl2spec.go", "docs/builders/libvirt.mdx",
                 "packer-plugin-sdk v0.3.2"):
        assert name in schema["$comment"]
    for block, spec in schema["$defs"].items():
        if block[0].isupper() or block == "communicator":
            assert spec["x-hcl2spec"].endswith(".go " + ("FlatConfig" if block in (
                "Config", "communicator") else f"Flat{block}"))
    json.dumps(schema)


def test_boot_command_http_urls_become_the_oemdrv_cd() -> None:
    out = libvirt_steps.boot_command_for_libvirt(
        ["<tab> inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg<enter>", "<wait>"], "i.yaml")
    assert out == ["<tab> inst.ks=hd:LABEL=OEMDRV:/ks.cfg<enter>", "<wait>"]
    with pytest.raises(ConfigError, match=r"boot_command\[0\]: the libvirt plugin has no HTTP"):
        libvirt_steps.boot_command_for_libvirt(["ip={{ .HTTPIP }}"], "i.yaml")


@pytest.mark.parametrize(("site", "message"), [
    ("backend: libvirt\n", "site.yaml: libvirt: missing required key 'libvirt'"),
    ("backend: libvirt\nlibvirt: {uri: 'kvm01', pool: p}\n",
     "site.yaml: libvirt.uri: 'kvm01' is not valid: a libvirt URI such as"),
    ("backend: libvirt\nlibvirt: {uri: 'qemu:///system', pool: p, netwrok: n}\n",
     "site.yaml: libvirt.netwrok: unknown key 'netwrok' (did you mean 'network'?)"),
    ("backend: libvrt\n", "site.yaml: backend: 'libvrt' is not one of 'qemu', 'libvirt'"),
])
def test_bad_libvirt_site(repo: Path, site: str, message: str) -> None:
    (repo / "site.yaml").write_text(site)
    proc = build_py(repo, "render", "smoke")
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_libvirt_steps_around_packer() -> None:
    """Preflight and upload only where Packer runs (not for ./build.py render); the download
    fills the hashing slot, so a build that hashes no disk (--create-patches) downloads none."""
    from osimage.build.context import BuildOptions
    from osimage.build.feature import assemble, select
    from osimage.build.steps import CORE

    def names(skipped: frozenset[str] = frozenset(), **opts: Any) -> list[str]:
        steps = assemble(CORE, libvirt_steps.BACKEND.steps, set(skipped))
        return [s.name for s in select(steps, BuildOptions(image="x", **opts))]

    assert names() == ["check up to date", "check mirror", "check release", "check published",
                       "prepare source", "make build key", "libvirt preflight",
                       "upload source to pool",
                       "render and validate HCL", "tag build on hypervisor", "packer build",
                       "download artifact volume", "publish to mirror",
                       "record in manifest.json"]
    assert names(render_only=True) == ["prepare source", "make build key",
                                       "render and validate HCL"]
    no_disk = frozenset({"artifacts", "publish", "record", "check release", "check published"})
    assert names(no_disk, publish=False) == [
        "prepare source", "make build key", "libvirt preflight", "upload source to pool",
        "render and validate HCL", "tag build on hypervisor", "packer build"]
