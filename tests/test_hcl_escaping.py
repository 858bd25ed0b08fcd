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


# --- property tests: every user-settable field, rendered in-process (no Packer run) -----------

from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from osimage.errors import ConfigError  # noqa: E402
from tests.conftest import make_repo  # noqa: E402

NASTY = ["\n", "\r", "\t", '"', "'", "\\", "${", "%{", "{{", "}}", "{{ timestamp }}", "*/",
         "/*", "#", "//", "\x00", "\x01", "\x1b", "\x7f", " ", "=", "$", "é", "漢", "..", "/",
         "a", "0", "-", "."]
AWKWARD_TEXT = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=4)),
                        max_size=6).map("".join)
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SOURCE_DISK = "build/sources/smoke/smoke.qcow2"
BASE_IMAGE: dict[str, Any] = {
    "source": {"disk": SOURCE_DISK, "checksum": "sha256:" + "0" * 64},
    "disk_size": "128M", "memory": 256, "cpus": 1, "boot_wait": "3s",
    "ssh": {"username": "root", "timeout": "2m"}, "shutdown_command": "poweroff",
    "provisioners": [{"name": "marker", "type": "shell", "script": "provision/marker.sh"}],
    "outputs": {"disk": {"format": "qcow2"}},
}


@dataclass
class Rendered:
    text: str
    parsed: dict[str, Any]
    image: dict[str, Any]  # image.yaml as read back
    site: dict[str, Any]
    version: str
    root: Path

    @property
    def source(self) -> dict[str, Any]:
        kind = "libvirt" if "libvirt" in self.parsed["source"][0] else "qemu"
        body: dict[str, Any] = self.parsed["source"][0][kind]["smoke"]
        return body

    @property
    def provisioners(self) -> list[tuple[str, dict[str, Any]]]:
        return [next(iter(p.items())) for p in self.parsed["build"][0]["provisioner"]]

    @property
    def image_dir(self) -> Path:
        return self.root / "images" / "smoke"


@pytest.fixture(scope="module")
def prop_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import os

    root = make_repo(tmp_path_factory.mktemp("prop") / "repo")
    disk = root / SOURCE_DISK
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"\0" * 4096)
    key = root.parent / "key" / "id_ed25519"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root.parent / "cache")  # validation markers stay here
    yield root
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def _inside(base: Path, rel: str) -> Path | None:
    """base/rel when it is a plain file name inside base, to create it for a path field."""
    try:
        target = (base / rel).resolve()
        if base.resolve() in target.parents:
            return target
    except (OSError, ValueError):
        pass
    return None


def render_with(root: Path, image: dict[str, Any], site: dict[str, Any] | None = None,
                release: str | None = None, create: tuple[str, ...] = (),
                folder: str | None = None) -> Rendered | None:
    """The build's own code from image.yaml to parsed HCL, as `./build.py render` runs it
    minus packer validate. None when the configuration was refused (exit 2), whose message
    must be one line. `create` names files (relative to the image folder) to make first."""
    import contextlib

    from osimage.backends.libvirt import steps as libvirt_steps
    from osimage.build import pipeline, render, steps
    from osimage.config import read_yaml
    from osimage.ui import Reporter

    image_dir = root / "images" / "smoke"
    made: list[Path] = []
    for rel in create:
        target = _inside(image_dir, rel)
        if target is not None and not target.exists():
            with contextlib.suppress(OSError):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
                made.append(target)
    if folder is not None:
        target = _inside(image_dir, folder)
        if target is not None and not target.exists():
            with contextlib.suppress(OSError):
                target.mkdir(parents=True)
                made.append(target)
    (image_dir / "image.yaml").write_text(_dump_yaml(image))
    site_file = root / "site.yaml"
    site_file.unlink(missing_ok=True)
    if site is not None:
        site_file.write_text(_dump_yaml(site))
    try:
        opts = pipeline.BuildOptions(image="smoke", release=release, skip_commit=True)
        ctx = pipeline.prepare(root, opts, Reporter(quiet=True))
        ctx.create_patches = "create" in image.get("patches", {})
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            steps.step_source(ctx, stack)
        ctx.key_file = root.parent / "key" / "id_ed25519"
        variables = steps.template_variables(ctx)
        template = "qemu.pkr.hcl.j2"
        if ctx.site.backend == "libvirt":
            build = libvirt_steps.state(ctx)
            variables.update(libvirt_steps.libvirt_variables(ctx, build, variables))
            template = "libvirt.pkr.hcl.j2"
        text = render.render(root / "templates", template, variables)
        parsed = render.parse_hcl(text, "smoke.pkr.hcl")
    except ConfigError as e:
        assert "\n" not in e.message, e.message
        return None
    finally:
        for path in reversed(made):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    site_data = read_yaml(site_file, "site.yaml") if site is not None else {}
    return Rendered(text, parsed, read_yaml(image_dir / "image.yaml", "image.yaml"), site_data,
                    ctx.version, root)


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of base with value at a dotted path (list indexes as numbers)."""
    import copy

    out = copy.deepcopy(base)
    node: Any = out
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return out


def _get(data: Any, path: str) -> Any:
    for k in path.split("."):
        data = data[int(k)] if k.isdigit() else data[k]
    return data


def _shell_env(env_file: str) -> dict[str, str]:
    out = subprocess.run(["sh", "-c", '. "$1" && exec env -0', "sh", env_file], check=True,
                         capture_output=True, env={"PATH": "/usr/bin:/bin"}).stdout
    pairs = [item.decode().partition("=") for item in out.split(b"\0") if item]
    return {k: v for k, _, v in pairs}


# (image.yaml key, how the rendered HCL shows it: a function of the Rendered and the value)
Check = Callable[[Rendered, Any], None]


def _source_field(field: str) -> Check:
    def check(r: Rendered, value: Any) -> None:
        assert r.source[field] == value
    return check


def _path_in_image(kind: str, field: str) -> Check:
    def check(r: Rendered, value: Any) -> None:
        assert any(body.get(field) == str(r.image_dir / value) for t, body in r.provisioners
                   if t == kind)
    return check


def _file_destination(r: Rendered, value: Any) -> None:
    assert any(body.get("destination") == value for t, body in r.provisioners if t == "file")


def _comment(r: Rendered, value: Any) -> None:
    from osimage.build.render import hcl_comment

    assert f"  # {hcl_comment(value)}\n" in r.text


def _env_value(r: Rendered, value: Any) -> None:
    files = [body["source"] for t, body in r.provisioners if t == "file"
             and body["source"].endswith(".env")]
    assert _shell_env(files[0])["V"] == value


def _env_name(r: Rendered, value: Any) -> None:
    files = [body["source"] for t, body in r.provisioners if t == "file"
             and body["source"].endswith(".env")]
    assert _shell_env(files[0])[value] == "v"


def _env_of(step: str) -> Check:
    def check(r: Rendered, value: Any) -> None:
        env = next(body["source"] for t, body in r.provisioners
                   if t == "file" and body["source"].endswith(f"-{step}.env"))
        assert _shell_env(env)["V"] == value
    return check


def _downloaded_from(r: Rendered, value: Any) -> None:
    assert any(body.get("source") == value for t, body in r.provisioners
               if t == "file" and body.get("direction") == "download")


def _http_directory(r: Rendered, value: Any) -> None:
    assert r.source["http_directory"] == str(r.image_dir / value)


def _inline(r: Rendered, value: Any) -> None:
    script = next(body["script"] for t, body in r.provisioners if t == "shell")
    assert Path(script).read_bytes().decode() == "#!/bin/sh -e\n" + value + "\n"


def _ansible_var(r: Rendered, value: Any) -> None:
    import json

    args = next(body["extra_arguments"] for t, body in r.provisioners if t == "ansible")
    assert args[0] == "--extra-vars" and args[1].startswith("@")
    data = json.loads(Path(args[1][1:]).read_text(encoding="utf-8"))
    assert data["V"] == {"__ansible_unsafe": value}


SHELL = {"name": "marker", "type": "shell", "script": "provision/marker.sh"}
ISO_IMAGE = _with(BASE_IMAGE, "source", {"iso": "http://mirror.invalid/x.iso",
                                         "checksum": "sha256:" + "0" * 64})
Make = Callable[[str], Any]
Pick = Callable[[Any], Any]
SAME: Pick = lambda v: v  # noqa: E731


def _field(field: str, base: dict[str, Any], make: Make, check: Check, pick: Pick = SAME,
           create: str = "") -> tuple[str, dict[str, Any], Make, Check, Pick, str]:
    """One row: where the value goes, how it is made from the text, how the HCL shows it, how
    to pick the value out of image.yaml as read back, and a file to make for a path field."""
    return field, base, make, check, pick, create


CREATE = _with(BASE_IMAGE, "patches", {"create": {"script": "patches/create.sh",
                                                  "output": "/tmp/out/p.tar.gz"}})
ROOTFS = _with(BASE_IMAGE, "outputs", {"disk": {}, "rootfs": {"script": "provision/marker.sh"}})
IMAGE_FIELDS = [
    _field("source.iso", ISO_IMAGE, lambda s: "http://mirror.invalid/" + s,
           _source_field("iso_url")),
    _field("source.checksum", ISO_IMAGE, lambda s: "file:http://mirror.invalid/" + s,
           _source_field("iso_checksum")),
    _field("disk_size", ISO_IMAGE, lambda s: "512M" + s, _source_field("disk_size")),
    _field("boot_wait", BASE_IMAGE, lambda s: "5s" + s, _source_field("boot_wait")),
    _field("boot_command", BASE_IMAGE, lambda s: [s], _source_field("boot_command")),
    _field("ssh.username", BASE_IMAGE, SAME, _source_field("ssh_username")),
    _field("ssh.timeout", BASE_IMAGE, lambda s: "2m" + s, _source_field("ssh_timeout")),
    _field("shutdown_command", BASE_IMAGE, SAME, _source_field("shutdown_command")),
    _field("provisioners.0.name", BASE_IMAGE, lambda s: "step" + s, _comment),
    _field("provisioners.0.script", BASE_IMAGE, SAME, _path_in_image("shell", "script"),
           create="."),
    _field("provisioners.0", BASE_IMAGE, lambda s: {"name": "i", "type": "shell", "inline": [s]},
           _inline, lambda d: d["inline"][0]),
    _field("provisioners.0", BASE_IMAGE, lambda s: {**SHELL, "environment": {"V": s}},
           _env_value, lambda d: d["environment"]["V"]),
    _field("provisioners.0", BASE_IMAGE, lambda s: {**SHELL, "environment": {"V" + s: "v"}},
           _env_name, lambda d: next(iter(d["environment"]))),
    _field("provisioners.0", BASE_IMAGE,
           lambda s: {"name": "f", "type": "file", "source": s, "destination": "/tmp/x"},
           _path_in_image("file", "source"), lambda d: d["source"], create="source"),
    _field("provisioners.0", BASE_IMAGE,
           lambda s: {"name": "f", "type": "file", "source": "provision/marker.sh",
                      "destination": "/tmp/" + s}, _file_destination, lambda d: d["destination"]),
    _field("provisioners.0", BASE_IMAGE,
           lambda s: {"name": "a", "type": "ansible", "playbook": s},
           _path_in_image("ansible", "playbook_file"), lambda d: d["playbook"],
           create="playbook"),
    _field("provisioners.0", BASE_IMAGE,
           lambda s: {"name": "a", "type": "ansible", "playbook": "provision/marker.sh",
                      "environment": {"V": s}}, _ansible_var, lambda d: d["environment"]["V"]),
    _field("http_directory", BASE_IMAGE, lambda s: "h" + s, _http_directory, create="/"),
    _field("patches.create.output", CREATE, lambda s: "/tmp/" + s, _downloaded_from),
    _field("patches.create.environment", CREATE, lambda s: {"V": s}, _env_of("patches-create"),
           lambda d: d["V"]),
    _field("outputs.rootfs.path", ROOTFS, lambda s: "/var/tmp/" + s, _downloaded_from),
]


@pytest.mark.parametrize("field,base,make,check,pick,create", IMAGE_FIELDS,
                         ids=[f"{f[0]}-{i}" for i, f in enumerate(IMAGE_FIELDS)])
@EXAMPLES
@given(text=AWKWARD_TEXT)
@example(text="")
@example(text="\n")  # a trailing newline: refused where a pattern applies, kept where not
@example(text="{{ timestamp }} ${x} %{y} \" \\ */ a b=c $HOME")
def test_image_field_is_refused_or_parsed_back_exactly(
        prop_root: Path, field: str, base: dict[str, Any], make: Make, check: Check, pick: Pick,
        create: str, text: str) -> None:
    value = make(text)
    files = () if create in ("", "/") else (value if create == "." else value[create],)
    r = render_with(prop_root, _with(base, field, value), create=files,
                    folder=value if create == "/" else None)
    if r is not None:
        check(r, pick(_get(r.image, field)))


def _output_directory(r: Rendered, value: Any) -> None:
    assert r.source["output_directory"] == str(r.root / value / "smoke" / r.version / "output")


def _libvirt_pool(r: Rendered, value: Any) -> None:
    assert [vol["pool"] for vol in r.source["volume"]] == [value] * 2


def _libvirt_nic(field: str) -> Check:
    def check(r: Rendered, value: Any) -> None:
        assert r.source["network_interface"][0][field] == value
    return check


def _plugin_version(r: Rendered, value: Any) -> None:
    assert r.parsed["packer"][0]["required_plugins"][0]["libvirt"]["version"] == "= " + value


LIBVIRT = {"backend": "libvirt", "libvirt": {"uri": "qemu:///system", "pool": "images"}}
SITE_FIELDS = [
    _field("build_dir", {}, lambda s: "b/" + s, _output_directory),
    _field("qemu.binary", {"qemu": {}}, SAME, _source_field("qemu_binary")),
    _field("sources.smoke", {"sources": {}},
           lambda s: {"iso": "http://mirror.invalid/" + s, "checksum": "sha256:" + "0" * 64},
           _source_field("iso_url"), lambda d: d["iso"]),
    _field("libvirt.uri", LIBVIRT, lambda s: "qemu+ssh://root@kvm01/" + s,
           _source_field("libvirt_uri")),
    _field("libvirt.pool", LIBVIRT, SAME, _libvirt_pool),
    _field("libvirt.network", LIBVIRT, SAME, _libvirt_nic("network")),
    _field("libvirt.bridge", LIBVIRT, SAME, _libvirt_nic("bridge")),
    _field("libvirt.plugin_version", LIBVIRT, lambda s: "0.5.0" + s, _plugin_version),
]


@pytest.mark.parametrize("field,base,make,check,pick,create", SITE_FIELDS,
                         ids=[f[0] for f in SITE_FIELDS])
@EXAMPLES
@given(text=AWKWARD_TEXT)
@example(text="\n")
@example(text="{{ timestamp }} ${x} %{y} \" \\ */")
def test_site_field_is_refused_or_parsed_back_exactly(
        prop_root: Path, field: str, base: dict[str, Any], make: Make, check: Check, pick: Pick,
        create: str, text: str) -> None:
    from hypothesis import assume

    value = make(text)
    if field == "build_dir":  # made by the build: only inside the test's repository
        assume(_inside(prop_root, value) is not None)
    r = render_with(prop_root, BASE_IMAGE, site=_with(base, field, value))
    if r is not None:
        check(r, pick(_get(r.site, field)))


@EXAMPLES
@given(text=AWKWARD_TEXT)
@example(text="2.4.0\n")
@example(text="2.4.0")
def test_release_name_is_refused_or_reaches_the_vm_exactly(prop_root: Path, text: str) -> None:
    r = render_with(prop_root, BASE_IMAGE, release=text)
    if r is None:
        return
    assert r.version == text + "-dirty"  # the test's tree is dirty: it rewrites image.yaml
    assert r.parsed["build"][0]["post-processor"][0]["manifest"]["custom_data"]["version"] \
        == r.version
    env = next(body["source"] for t, body in r.provisioners if t == "file")
    assert _shell_env(env)["OSIMAGE_VERSION"] == r.version


# --- what a user sees: one line, exit status 2, for a value Packer or HCL would misread -------


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("field,value", [
    ("provisioners.0", {**SHELL, "environment": {"V": "x\ud800"}}),
    ("provisioners.0", {"name": "i", "type": "shell", "inline": ["echo \udfff"]}),
    ("shutdown_command", "poweroff \ud800"),
])
def test_text_that_is_not_unicode_is_refused(prop_root: Path, field: str, value: Any) -> None:
    """YAML's "\\ud800" is a lone surrogate, which no file can hold: exit 2, no traceback."""
    assert render_with(prop_root, _with(BASE_IMAGE, field, value)) is None


def test_comments_hold_plain_text_or_a_literal() -> None:
    from osimage.build.render import hcl_comment

    assert hcl_comment("qemu+ssh://root@kvm01/system") == "qemu+ssh://root@kvm01/system"
    assert hcl_comment("a\nb = 1 */ ${x}") == '"a\\nb = 1 */ \\u0024{x}"'


def test_release_with_a_trailing_newline_is_refused(repo: Path) -> None:
    line = _one_error_line(build_py(repo, "render", "smoke", "--release", "2.4.0\n"))
    assert line == "error: --release: '2.4.0\\n' is not a valid release name"


def test_a_packer_template_in_image_yaml_is_refused_by_key(repo: Path) -> None:
    yaml = repo / "images" / "smoke" / "image.yaml"
    yaml.write_text(yaml.read_text().replace("username: root", "username: '{{ user `x` }}'"))
    line = _one_error_line(build_py(repo, "render", "smoke"))
    assert line.startswith("error: images/smoke/image.yaml: ssh.username: '{{ user `x` }}' "
                           "is not valid")


def test_libvirt_uri_with_a_newline_is_refused(repo: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text('backend: libvirt\nlibvirt:\n  uri: "qemu:///system\\n# x"\n  pool: p\n')
    line = _one_error_line(build_py(repo, "render", "smoke", "--site", str(site)))
    assert line.startswith("error: ") and "libvirt.uri: 'qemu:///system\\n# x' is not valid" \
        in line


def test_a_repository_path_packer_would_expand_is_refused(tmp_path: Path,
                                                          smoke_sources: Path) -> None:
    root = make_repo(tmp_path / "{{ timestamp }}" / "repo")
    shutil.copytree(smoke_sources, root / "build" / "sources" / "smoke")
    line = _one_error_line(build_py(root, "render", "smoke"))
    assert "holds '{{', which Packer would expand as a template" in line
    assert not list((root / "build" / "smoke").glob("*/smoke.pkr.hcl"))


@pytest.mark.parametrize(("module", "name", "good"), [
    ("osimage.release.commands", "SHA256", "a" * 64),
    ("osimage.sizes", "_SIZE", "4G"),
    ("osimage.features.patchindex", "_ADVISORY_ID", "RLSA-2024:1234"),
    ("osimage.backends.libvirt.clean", "_RUN", "0f4c3a2e-1b2c-4d5e-8f90-123456789abc"),
    ("osimage.features.tarheaders", "_PAX_TIME", "1700000000.5"),
])
def test_every_pattern_is_matched_whole(module: str, name: str, good: str) -> None:
    """A value that passes a pattern check passes it whole: a trailing newline is refused."""
    import importlib

    pattern = getattr(importlib.import_module(module), name)
    assert pattern.match(good)
    assert not pattern.match(good + "\n")
