"""The smoke image's source disk: made from Debian packages only, byte for byte reproducible."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT

SCRIPT = PROJECT / "scripts" / "make-smoke-disk.sh"


def test_smoke_disk_is_reproducible(tmp_path: Path, smoke_sources: Path) -> None:
    again = tmp_path / "again"
    subprocess.run([str(SCRIPT), str(again)], check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp_path)})
    first = (smoke_sources / "smoke.qcow2").read_bytes()
    second = (again / "smoke.qcow2").read_bytes()
    assert first == second
    assert (again / "smoke.qcow2.sha256").read_text() == (
        smoke_sources / "smoke.qcow2.sha256").read_text()
    assert len(second) < 30 * 2**20


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck() -> None:
    scripts = [str(p) for p in (PROJECT / "scripts").glob("*.sh")]
    scripts += [str(p) for p in (PROJECT / "images").rglob("*.sh")]
    proc = subprocess.run(["shellcheck", "-S", "warning", *scripts], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout
