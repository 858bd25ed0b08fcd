"""images/alma9-base and images/alma9-compute (Warewulf's seed image as production definitions)
without the AlmaLinux DVD: the kickstart, rendered as a build renders it, passes `ksvalidator -v
RHEL9`; the compute layer's playbooks pass ansible-playbook --syntax-check and ansible-lint and
install the seed's packages; both images render for the qemu and the libvirt backend, and the
libvirt HCL parses with python-hcl2 and passes the plugin's schema."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from osimage.build import hclschema
from osimage.features import httpdir
from tests.conftest import PROJECT, build_py, make_repo
from tests.test_tidy import add_build

BASE = PROJECT / "images" / "alma9-base"
COMPUTE = PROJECT / "images" / "alma9-compute"
SCHEMA = PROJECT / "osimage" / "schemas" / "image.schema.json"

LIBVIRT_SITE = """\
backend: libvirt
libvirt:
  uri: qemu+ssh://root@kvm01.example/system
  pool: images
  network: builds
  driver: plugin
"""


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None,
                              reason=f"{tool} is not installed (scripts/setup.sh installs it)")


def layers_supported() -> bool:
    """A child image (parent:, no source:) loads only once layered images are implemented."""
    return "source" not in json.loads(SCHEMA.read_text())["required"]


@pytest.fixture(scope="module")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "osimage-build-test",
                    "-f", str(key)], check=True)
    return Path(str(key) + ".pub").read_text().strip()


@pytest.fixture(scope="module")
def kickstart(tmp_path_factory: pytest.TempPathFactory, public_key: str) -> Path:
    """http/ks.cfg.j2 rendered the way a build renders it (osimage/features/httpdir.py)."""
    out = tmp_path_factory.mktemp("http")
    values = {"ssh_public_key": public_key, "ssh_username": "root", "image": "alma9-base",
              "version": "3.0.0", "commit": "0" * 40, "release": "3.0.0"}
    rendered = httpdir.render_folder(BASE / "http", out / "http", values, "http")
    assert [p.name for p in rendered] == ["ks.cfg"]
    return out / "http" / "ks.cfg"


@needs("ksvalidator")
def test_kickstart_passes_ksvalidator_rhel9(kickstart: Path, tmp_path: Path) -> None:
    proc = subprocess.run(["ksvalidator", "-v", "RHEL9", str(kickstart)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the check means something: a broken command, or one RHEL 9 dropped, fails it
    for bad_text in (kickstart.read_text().replace("rootpw --lock", "rootpw --lock --bogus"),
                     kickstart.read_text() + "\nauthconfig --enableshadow\n"):
        bad = tmp_path / "ks.cfg"
        bad.write_text(bad_text)
        proc = subprocess.run(["ksvalidator", "-v", "RHEL9", str(bad)], capture_output=True,
                              text=True)
        assert proc.returncode != 0


def test_kickstart_holds_the_public_key_and_no_password(kickstart: Path, public_key: str) -> None:
    text = kickstart.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert f'sshkey --username=root "{public_key}"' in lines
    assert "rootpw --lock" in lines
    assert not [line for line in lines if line.startswith(("user ", "rootpw --plaintext",
                                                           "rootpw --iscrypted"))]
    assert "PRIVATE KEY" not in text
    # a layer's build (alma9-compute) boots this disk and gets its key into /run at boot
    assert "AuthorizedKeysFile .ssh/authorized_keys /run/osimage/authorized_keys" in lines
    assert "systemctl enable osimage-authorized-keys.service" in lines
    assert "opt/osimage/authorized_keys" in text and "by-label/OEMDRV" in text


@needs("ansible-playbook")
def test_compute_playbooks_pass_syntax_check() -> None:
    playbooks = sorted((COMPUTE / "ansible").glob("*.yml"))
    assert [p.name for p in playbooks] == ["packages.yml", "repos.yml"]
    proc = subprocess.run(["ansible-playbook", "--syntax-check", "-i", "localhost,",
                           *map(str, playbooks)], capture_output=True, text=True,
                          cwd=COMPUTE / "ansible")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs("ansible-lint")
def test_compute_playbooks_pass_ansible_lint(tmp_path: Path) -> None:
    # A copy: ansible-lint leaves an .ansible/ folder in the project it checks.
    shutil.copytree(COMPUTE / "ansible", tmp_path / "ansible")
    proc = subprocess.run(["ansible-lint", "--offline", "--nocolor", "ansible"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compute_installs_the_seed_packages_from_epel_and_openhpc3() -> None:
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load((COMPUTE / "ansible/vars/packages.yml").read_text())
    packages = {p for names in data["node_packages"].values() for p in names}
    assert packages == {"ohpc-slurm-client", "apptainer", "NetworkManager",
                        "NetworkManager-team", "iproute", "ethtool", "iperf3", "vim-enhanced",
                        "nano"}
    assert data["slurm_version"] == "24.11"
    repos = (COMPUTE / "ansible/repos.yml").read_text()
    assert "epel-release" in repos and "crb" in repos
    assert "repos.openhpc.community/OpenHPC/3/EL_9/x86_64/ohpc-release-3-" in repos
    tasks = (COMPUTE / "ansible/packages.yml").read_text()
    assert "name: munge\n        enabled: true" in tasks
    assert "{{ OSIMAGE_VERSION }}" in tasks  # from --extra-vars @FILE.json


def test_layers_and_cleanup() -> None:
    from ruamel.yaml import YAML

    base = YAML(typ="safe").load((BASE / "image.yaml").read_text())
    compute = YAML(typ="safe").load((COMPUTE / "image.yaml").read_text())
    assert compute["parent"] == "alma9-base" and "source" not in compute
    assert "parent" not in base and base["source"]["iso"].endswith("AlmaLinux-9.5-x86_64-dvd.iso")
    for image in (base, compute):
        assert set(image["outputs"]) == {"disk", "rootfs", "boot", "squashfs", "oci"}
        assert image["provisioners"][-1]["name"] == "cleanup"
    # one cleanup and one rootfs export for both layers, kept the same
    for script in ("cleanup.sh", "rootfs.sh"):
        assert (BASE / "scripts" / script).read_bytes() == \
            (COMPUTE / "scripts" / script).read_bytes()
    cleanup = (BASE / "scripts/cleanup.sh").read_text()
    for piece in ("dnf clean all", "truncate -s 0 /etc/machine-id", "rm -f /etc/ssh/ssh_host_*",
                  "find /var/log -type f -exec truncate -s 0 {} +"):
        assert piece in cleanup
    commands = [line for line in cleanup.splitlines() if line and not line.startswith("#")]
    assert commands[-3] == ": > /root/.ssh/authorized_keys"


@pytest.fixture(scope="module")
def alma_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test repository where alma9-base has a clean published build, as a build at the site
    records it (the disk is a small empty qcow2: nothing here boots it), so alma9-compute,
    which starts from it, renders."""
    repo = make_repo(tmp_path_factory.mktemp("alma") / "repo")
    disk = tmp_path_factory.mktemp("disk") / "alma9-base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "20G"], check=True)
    if layers_supported():
        add_build(repo, "alma9-base", "3.0.0", mirror=repo / "mirror",
                  content=disk.read_bytes())
    return repo


@pytest.mark.parametrize("image", ["alma9-base", "alma9-compute"])
def test_renders_for_both_backends(alma_repo: Path, tmp_path: Path, image: str) -> None:
    proc = build_py(alma_repo, "render", image)
    assert proc.returncode == 0, proc.stderr
    text = (alma_repo / proc.stdout.strip()).read_text()
    assert 'source "qemu"' in text
    assert text.count("use_proxy       = false") == (2 if image == "alma9-compute" else 0)
    # a layer boots its parent's disk through a qcow2 overlay, the base its DVD
    assert ("use_backing_file = true" in text) == (image == "alma9-compute")
    site = tmp_path / "libvirt-site.yaml"
    site.write_text(LIBVIRT_SITE)
    proc = build_py(alma_repo, "render", image, "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    hcl = alma_repo / proc.stdout.strip()
    parsed = hclschema.check_text(hcl.read_text(), str(hcl))
    src = parsed["source"][0]["libvirt"][image]
    assert src["libvirt_uri"] == "qemu+ssh://root@kvm01.example/system"
    assert parsed["build"][0]["sources"] == [f"source.libvirt.{image}"]
    if image == "alma9-compute":
        assert "parent alma9-base 3.0.0" in proc.stderr
    else:
        assert "inst.ks=hd:LABEL=OEMDRV:/ks.cfg" in src["boot_command"][0]
        ks = (hcl.parent / "http" / "ks.cfg").read_text()
        key = next(v for v in src["volume"] if v.get("alias") == "oemdrv")["source"][0][
            "contents"]["osimage/authorized_keys"].strip()
        assert f'sshkey --username=root "{key}"' in ks
    # and for the native driver, the default: a null source Packer provisions over SSH
    site.write_text(LIBVIRT_SITE.replace("  driver: plugin\n", ""))
    proc = build_py(alma_repo, "render", image, "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    assert 'source "null"' in (alma_repo / proc.stdout.strip()).read_text()


def test_build_without_the_dvd_is_refused_before_packer(alma_repo: Path, tmp_path: Path) -> None:
    """At the site the DVD is a local copy named by the site file; a copy that is not there
    stops the build at 'prepare source' (exit 2), nothing built."""
    site = tmp_path / "site.yaml"
    site.write_text("sources:\n  alma9-base:\n    iso: build/isos/AlmaLinux-9.5-x86_64-dvd.iso\n"
                    "    checksum: sha256:" + "ab" * 32 + "\n")
    proc = build_py(alma_repo, "alma9-base", "--site", str(site), "--skip-commit")
    assert proc.returncode == 2, proc.stderr
    assert "build/isos/AlmaLinux-9.5-x86_64-dvd.iso does not exist" in proc.stderr
    assert "packer build" not in proc.stderr
