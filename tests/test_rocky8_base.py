"""images/rocky8-base without the DVD: the kickstart (rendered as a build renders it) passes
ksvalidator, the playbooks pass ansible-playbook --syntax-check and ansible-lint, the HCL renders
and validates, and a site file can point the build at a local copy of the DVD."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from osimage.errors import BuildError, ConfigError
from osimage.features import httpdir
from tests.conftest import PROJECT, build_py, git, make_repo

IMAGE = PROJECT / "images" / "rocky8-base"
PLAYBOOKS = sorted((IMAGE / "ansible").glob("*.yml"))
DVD_SHA256 = "0081f8b969d0cef426530f6d618b962c7a01e71eb12a40581a83241f22dfdc25"


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None,
                              reason=f"{tool} is not installed (scripts/setup.sh installs it)")


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
    values = {"ssh_public_key": public_key, "ssh_username": "root", "image": "rocky8-base",
              "version": "2.4.0", "commit": "0" * 40, "release": "2.4.0"}
    rendered = httpdir.render_folder(IMAGE / "http", out / "http", values, "http")
    assert [p.name for p in rendered] == ["ks.cfg"]
    return out / "http" / "ks.cfg"


@needs("ksvalidator")
def test_kickstart_passes_ksvalidator(kickstart: Path) -> None:
    proc = subprocess.run(["ksvalidator", "-v", "RHEL8", str(kickstart)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kickstart_holds_the_public_key_and_no_password(kickstart: Path, public_key: str) -> None:
    lines = [line.strip() for line in kickstart.read_text().splitlines()]
    assert f'sshkey --username=root "{public_key}"' in lines
    assert "rootpw --lock" in lines
    commands = [line for line in lines if line and not line.startswith("#")]
    assert not [line for line in commands if line.startswith(("user ", "rootpw --plaintext",
                                                              "rootpw --iscrypted"))]
    assert "PRIVATE KEY" not in kickstart.read_text()
    assert "PermitRootLogin prohibit-password" in kickstart.read_text()
    assert "console=ttyS0,115200n8" in kickstart.read_text()


@needs("ksvalidator")
def test_ksvalidator_catches_a_bad_kickstart(kickstart: Path, tmp_path: Path) -> None:
    """The check above means something: a broken command fails it."""
    bad = tmp_path / "ks.cfg"
    bad.write_text(kickstart.read_text().replace("rootpw --lock", "rootpw --lock --bogus"))
    proc = subprocess.run(["ksvalidator", "-v", "RHEL8", str(bad)], capture_output=True)
    assert proc.returncode != 0


@needs("ansible-playbook")
def test_playbooks_pass_syntax_check() -> None:
    assert PLAYBOOKS
    proc = subprocess.run(["ansible-playbook", "--syntax-check", "-i", "localhost,",
                           *map(str, PLAYBOOKS)], capture_output=True, text=True,
                          cwd=IMAGE / "ansible")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs("ansible-lint")
def test_playbooks_pass_ansible_lint(tmp_path: Path) -> None:
    # A copy: ansible-lint leaves an .ansible/ folder in the project it checks.
    shutil.copytree(IMAGE / "ansible", tmp_path / "ansible")
    proc = subprocess.run(["ansible-lint", "--offline", "--nocolor", "ansible"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_packages_cover_the_node_roles() -> None:
    from ruamel.yaml import YAML

    groups = YAML(typ="safe").load((IMAGE / "ansible/vars/packages.yml").read_text())
    packages = {p for names in groups["node_packages"].values() for p in names}
    for wanted in ("slurm-slurmd", "munge", "apptainer", "nfs-utils", "chrony", "rdma-core",
                   "infiniband-diags", "gdb", "strace"):
        assert wanted in packages


def test_cleanup_removes_identity_and_the_build_key_last() -> None:
    script = (IMAGE / "scripts/cleanup.sh").read_text()
    for piece in ("dnf clean all", "truncate -s 0 /etc/machine-id", "rm -f /etc/ssh/ssh_host_*",
                  "/var/log", "anaconda-ks.cfg"):
        assert piece in script
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert commands[-3] == ": > /root/.ssh/authorized_keys"


@pytest.fixture
def r8_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def test_render_serves_the_rendered_kickstart(r8_repo: Path) -> None:
    proc = build_py(r8_repo, "render", "rocky8-base")
    assert proc.returncode == 0, proc.stderr
    hcl = r8_repo / proc.stdout.strip()
    text = hcl.read_text()
    http = hcl.parent / "http"
    assert f'http_directory   = "{http}"' in text
    assert "Rocky-8.5-x86_64-dvd1.iso" in text and f"sha256:{DVD_SHA256}" in text
    assert "inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg" in text
    # ansible-playbook connects with the build's key itself (see templates/_build.pkr.hcl.j2)
    assert text.count("use_proxy       = false") == 2
    assert text.index("ansible/packages.yml") < text.index("scripts/cleanup.sh")
    ks = (http / "ks.cfg").read_text()
    assert "sshkey --username=root \"ssh-ed25519 " in ks and "osimage-build-" in ks
    assert not list(http.glob("*.j2"))
    assert "render http files" in proc.stderr


def test_site_file_points_at_a_local_copy_of_the_dvd(r8_repo: Path, tmp_path: Path) -> None:
    dvd = tmp_path / "Rocky-8.5-x86_64-dvd1.iso"
    dvd.write_bytes(b"a stand-in for the DVD")
    site = tmp_path / "site.yaml"
    site.write_text(f"sources:\n  rocky8-base:\n    iso: {dvd}\n"
                    f"    checksum: sha256:{DVD_SHA256}\n")
    proc = build_py(r8_repo, "render", "rocky8-base", "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    text = (r8_repo / proc.stdout.strip()).read_text()
    assert f'iso_url          = "{dvd}"' in text
    assert "dl.rockylinux.org" not in text
    assert "(sources.rocky8-base)" in proc.stderr
    # other images keep their own source
    proc = build_py(r8_repo, "render", "usb-installer", "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    assert "alpine-standard" in (r8_repo / proc.stdout.strip()).read_text()


@pytest.mark.parametrize(("body", "expected"), [
    ("    iso: /srv/isos/Rocky-8.5-x86_64-dvd1.iso\n",
     "sources.rocky8-base.checksum: missing required key 'checksum'"),
    ("    iso: /srv/a.iso\n    disk: /srv/b.qcow2\n    checksum: sha256:" + DVD_SHA256 + "\n",
     "sources.rocky8-base: give exactly one of 'iso' or 'disk'"),
    ("    iso: /srv/a.iso\n    checksum: sha256:" + DVD_SHA256 + "\n    prepare: x.sh\n",
     "sources.rocky8-base.prepare: unknown key 'prepare'"),
    ("    iso: /nonexistent/Rocky-8.5-x86_64-dvd1.iso\n    checksum: sha256:" + DVD_SHA256 + "\n",
     "site.yaml: sources.rocky8-base: /nonexistent/Rocky-8.5-x86_64-dvd1.iso does not exist"),
])
def test_bad_source_override_is_exit_2(r8_repo: Path, tmp_path: Path, body: str,
                                       expected: str) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("sources:\n  rocky8-base:\n" + body)
    proc = build_py(r8_repo, "render", "rocky8-base", "--site", str(site))
    assert proc.returncode == 2, proc.stderr
    first = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "site.yaml" in first and expected in first, first


def test_http_templates_refuse_a_private_key_and_name_unknown_variables(tmp_path: Path) -> None:
    src = tmp_path / "http"
    src.mkdir()
    (src / "ks.cfg.j2").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(BuildError, match="holds a private key"):
        httpdir.render_folder(src, tmp_path / "out", {}, "images/x/http")
    (src / "ks.cfg.j2").write_text("sshkey {{ ssh_pubkey }}\n")
    with pytest.raises(ConfigError, match=r"images/x/http/ks.cfg.j2: 'ssh_pubkey' is undefined"):
        httpdir.render_folder(src, tmp_path / "out", {"ssh_public_key": "k"}, "images/x/http")


def test_build_without_the_dvd_is_refused_before_packer(r8_repo: Path, tmp_path: Path) -> None:
    """A site copy that is not there: exit 2 at 'prepare source', nothing built."""
    site = tmp_path / "site.yaml"
    site.write_text("sources:\n  rocky8-base:\n    iso: build/isos/Rocky-8.5-x86_64-dvd1.iso\n"
                    f"    checksum: sha256:{DVD_SHA256}\n")
    proc = build_py(r8_repo, "rocky8-base", "--site", str(site))
    assert proc.returncode == 2, proc.stderr
    assert "build/isos/Rocky-8.5-x86_64-dvd1.iso does not exist" in proc.stderr
    assert "packer build" not in proc.stderr


LIBVIRT_SITE = """\
backend: libvirt
libvirt:
  uri: qemu+ssh://root@kvm01.example/system
  pool: images
  network: builds
  driver: plugin
"""


def test_libvirt_render_puts_the_rendered_kickstart_on_the_oemdrv_cd(r8_repo: Path,
                                                                     tmp_path: Path) -> None:
    from osimage.build import hclschema

    site = tmp_path / "libvirt-site.yaml"
    site.write_text(LIBVIRT_SITE)
    proc = build_py(r8_repo, "render", "rocky8-base", "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    hcl = r8_repo / proc.stdout.strip()
    parsed = hclschema.check_text(hcl.read_text(), str(hcl))
    src = parsed["source"][0]["libvirt"]["rocky8-base"]
    oemdrv = next(v for v in src["volume"] if v.get("alias") == "oemdrv")["source"][0]
    assert oemdrv["files"] == [str(hcl.parent / "http" / "ks.cfg")]
    key = oemdrv["contents"]["osimage/authorized_keys"].strip()
    assert f'sshkey --username=root "{key}"' in (hcl.parent / "http" / "ks.cfg").read_text()
    assert "inst.ks=hd:LABEL=OEMDRV:/ks.cfg" in src["boot_command"][0]
    assert hcl.read_text().count("use_proxy       = false") == 2


@pytest.mark.vm
@needs("ansible-playbook")
def test_ansible_provisioner_logs_in_with_the_build_key(repo: Path, tmp_path: Path,
                                                       no_leftover_qemu: None) -> None:
    """The template's ansible provisioner (use_proxy = false) in a real build of the smoke
    image: ansible-playbook reaches the VM with the build's key. The smoke VM has no Python,
    so the playbook uses the raw module only."""
    image = repo / "images" / "smoke"
    (image / "provision" / "raw.yml").write_text(
        "---\n- name: Raw\n  hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Marker\n      ansible.builtin.raw: "
        "echo \"ansible {{ OSIMAGE_IMAGE }} $(id -u)\" > /data/ansible-marker && sync\n")
    text = (image / "image.yaml").read_text()
    text = text.replace("provisioners:\n", "provisioners:\n  - name: raw\n    type: ansible\n"
                                          "    playbook: provision/raw.yml\n", 1)
    (image / "image.yaml").write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke: an ansible provisioner")
    proc = build_py(repo, "smoke")
    assert proc.returncode == 0, proc.stderr
    log = next((repo / "build" / "smoke").glob("*/packer.log")).read_text()
    assert "Not using Proxy adapter for Ansible run" in log
    artifact = next((repo / "mirror" / "builds" / "smoke").glob("*/smoke.qcow2"))
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)], check=True)
    marker = subprocess.run(["debugfs", "-R", "cat /ansible-marker", f"{raw}?offset=67108864"],
                            check=True, capture_output=True, text=True).stdout
    assert marker.strip() == "ansible smoke 0"
