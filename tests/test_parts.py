"""The pieces of the pipeline on their own: HCL literals, Packer's machine-readable output,
hashing, the manifest under concurrent writers and kill -9, the local mirror."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from osimage.build import packer, render
from osimage.errors import BuildError
from osimage.publish import artifacts
from osimage.publish.artifacts import Artifact
from osimage.publish.mirror import LocalMirror
from osimage.release import image_manifest as manifest


@given(st.text())
def test_any_string_stays_one_hcl_string(text: str) -> None:
    """Whatever an image.yaml holds, its value renders as exactly one HCL string literal."""
    literal = render.hcl_value(text)
    parsed = render.parse_hcl(f"x = {literal}\ny = 1\n", "t.hcl")
    assert parsed["x"] == text and parsed["y"] == 1


def test_hcl_escapes_template_sequences() -> None:
    assert render.hcl_value("a ${b} %{c}") == '"a \\u0024{b} \\u0025{c}"'
    assert render.hcl_value(["x", 1, True]) == '["x", 1, true]'
    assert render.hcl_value({"k": "v"}) == '{ "k" = "v" }'


def test_parse_hcl_error_is_clear() -> None:
    with pytest.raises(BuildError, match=r"t\.hcl: the rendered HCL does not parse"):
        render.parse_hcl('source "qemu" {\n', "t.hcl")


def test_machine_readable_lines() -> None:
    line = "1795435382,,ui,say,==> qemu.smoke: Starting VM%!(PACKER_COMMA) booting disk image"
    parsed = packer.parse_machine_line(line)
    assert parsed is not None and parsed.kind == "ui"
    assert parsed.data == ["say", "==> qemu.smoke: Starting VM, booting disk image"]
    log = io.StringIO()
    steps: list[str] = []
    progress = packer.BuildProgress(log=log, on_step=steps.append)
    for raw in (line,
                "1795435382,,ui,message,    qemu.smoke: line one\\n    qemu.smoke: line two",
                "1795435388,qemu.smoke,artifact,0,file,0,/tmp/out/smoke.qcow2",
                "1795435388,qemu.smoke,artifact,0,id,VM",
                "1795435067,,ui,error,Error: boom"):
        progress.feed(raw)
    assert steps == ["Starting VM, booting disk image"]
    assert "line two" in log.getvalue()
    assert progress.artifact_id == "VM" and progress.errors == ["Error: boom"]


def test_hash_file_one_pass(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    f = tmp_path / "a.img"
    f.write_bytes(data)
    art = artifacts.record(f)
    assert art.size == len(data) and art.sha256 == hashlib.sha256(data).hexdigest()
    text = (tmp_path / "a.img.sha256").read_text()
    assert text == f"{art.sha256}  a.img\n"
    assert artifacts.parse_checksum_file(text, "a.img") == art.sha256
    ok = subprocess.run(["sha256sum", "-c", "a.img.sha256"], cwd=tmp_path, capture_output=True)
    assert ok.returncode == 0


WRITER = """
import sys, uuid
from pathlib import Path
from osimage.release import image_manifest as manifest
path = Path(sys.argv[1])
for i in range(int(sys.argv[2])):
    run = str(uuid.uuid4())
    manifest.append_build(path, {"name": "x", "packer_run_uuid": run, "files": [],
                                 "custom_data": {"writer": sys.argv[3], "i": i,
                                                 "pad": "x" * 20000}})
"""


def test_manifest_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "25", str(w)], env=env)
             for w in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    data = manifest.read(path)
    assert len(data["builds"]) == 100
    assert data["last_run_uuid"] == data["builds"][-1]["packer_run_uuid"]


def test_manifest_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "100000", "k"], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(path.read_text())  # always whole, never half written
        assert isinstance(data["builds"], list)
    # the next writer sweeps the temp files a killed writer left
    manifest.append_build(path, {"name": "x", "packer_run_uuid": "last", "files": []})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert manifest.read(path)["last_run_uuid"] == "last"


def test_local_mirror_publishes_whole_files_only(tmp_path: Path) -> None:
    src = tmp_path / "out" / "disk.qcow2"
    src.parent.mkdir()
    src.write_bytes(b"x" * 100000)
    art = artifacts.record(src)
    mirror = LocalMirror(tmp_path / "mirror")
    paths = mirror.publish([art], "builds/img/1.0")
    assert paths == ["builds/img/1.0/disk.qcow2", "builds/img/1.0/disk.qcow2.sha256"]
    assert (tmp_path / "mirror/builds/img/1.0/disk.qcow2").read_bytes() == src.read_bytes()
    assert (tmp_path / "mirror/repos/Rocky8").is_dir()
    # a failure while copying leaves neither a final nor a temporary file
    missing = Artifact(path=tmp_path / "out" / "gone.qcow2", size=1, sha256="0" * 64)
    with pytest.raises(BuildError, match=r"publishing to builds/img/2\.0 failed"):
        mirror.publish([art, missing], "builds/img/2.0")
    assert list((tmp_path / "mirror/builds/img/2.0").iterdir()) == []
