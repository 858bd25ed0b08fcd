"""What a user writes reaches the HCL, Packer and the VM exactly as written (issue 12.4).

A real smoke build carries awkward environment values, inline commands and Ansible variables
into the VM, and the test reads them back out of the artifact byte for byte. The property tests
feed arbitrary strings into every user-settable field that reaches the rendered HCL: either the
build stops with exit status 2 and one line, or python-hcl2 parses back exactly the input.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import build_py, git

P2_OFFSET = 67108864  # the smoke disk's data partition (scripts/make-smoke-disk.sh)

# Each would be changed by one of: HCL (${ %{ quotes, backslashes, newlines), Packer's Go
# templates ({{ }}), the shell (quotes, $), Ansible's key=value parsing (spaces, =) or its
# Jinja2 ({{ }}).
AWKWARD = {
    "V_TEMPLATE": "{{ timestamp }}",
    "V_BUILD": "{{ build_name }}-{{ .Path }}",
    "V_DOLLAR": "$HOME ${HOME} %{ if x }",
    "V_EQUALS": "a b=c d",
    "V_QUOTES": "it's \"quoted\" `uname`",
    "V_BACKSLASH": "back\\slash \\n \\\\",
    "V_LINES": "line one\nline two\n",
    "V_COMMENT": "*/ # // /* -->",
    "V_CONTROL": "tab\there\x01\x1b[0m",
    "V_UNICODE": "é ✓ 漢字",
}
INLINE = ["echo '{{ build_name }} {{ timestamp }} $HOME ${x}' > /data/inline", "sync"]
PLAYBOOK = """---
- name: Awkward variables
  hosts: all
  gather_facts: false
  tasks:
    - name: Write each variable as it arrived
      ansible.builtin.raw: "printf '%s' {{ item.value | quote }} > /data/ansible-{{ item.key }}"
      loop: "{{ lookup('ansible.builtin.dict', vars_to_write) }}"
      vars:
        vars_to_write:
"""


def _dump_yaml(data: object) -> str:
    from ruamel.yaml import YAML

    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(data, out)
    return out.getvalue()


def _read_back(raw: Path, name: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat /{name}", f"{raw}?offset={P2_OFFSET}"],
                          check=True, capture_output=True).stdout


@pytest.mark.vm
@pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                    reason="ansible-playbook is not installed (scripts/setup.sh installs it)")
def test_values_reach_the_vm_byte_for_byte(repo: Path, tmp_path: Path,
                                          no_leftover_qemu: None) -> None:
    from ruamel.yaml import YAML

    image = repo / "images" / "smoke"
    data = YAML(typ="safe", pure=True).load((image / "image.yaml").read_text())
    writes = [f'printf \'%s\' "${k}" > /data/env-{k}' for k in AWKWARD]
    names = "\n".join(f"          {k}: \"{{{{ {k} }}}}\"" for k in AWKWARD)
    (image / "provision" / "awkward.yml").write_text(PLAYBOOK + names + "\n")
    data["provisioners"] = [
        {"name": "env", "type": "shell", "inline": [*writes, "sync"], "environment": AWKWARD},
        {"name": "inline", "type": "shell", "inline": INLINE},
        {"name": "ansible", "type": "ansible", "playbook": "provision/awkward.yml",
         "environment": AWKWARD},
        *data["provisioners"],
    ]
    (image / "image.yaml").write_text(_dump_yaml(data))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "smoke: awkward values")

    proc = build_py(repo, "smoke", "--release", "9.9.9")
    assert proc.returncode == 0, proc.stderr
    artifact = repo / "mirror" / "builds" / "smoke" / "9.9.9" / "smoke.qcow2"
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)], check=True)
    for key, value in AWKWARD.items():
        assert _read_back(raw, f"env-{key}") == value.encode(), key
        assert _read_back(raw, f"ansible-{key}") == value.encode(), key
    assert _read_back(raw, "inline") == b"{{ build_name }} {{ timestamp }} $HOME ${x}\n"
    assert b"version=9.9.9\n" in _read_back(raw, "marker")
