"""The small files of ~/.cache/osimage that every build reads (accelerator.json,
packer-version.json) are replaced whole, never rewritten in place: a second build (another
user, another test worker) that opened the file a moment earlier reads the old bytes whole,
not a truncated file that it would take for no cache at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from osimage.build import accel, packer


def _stale_then_rewritten(path: Path, stale: dict[str, object],
                          rewrite: Callable[[], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.dumps(stale)
    path.write_text(old)
    with path.open() as reader:  # a build that opened it before this one rewrote it
        rewrite()
        assert reader.read() == old, "the file was rewritten in place under a reader"
    assert json.loads(path.read_text()) != stale


def test_accelerator_cache_is_replaced_whole(tmp_path: Path) -> None:
    cache = tmp_path / "osimage"
    _stale_then_rewritten(cache / "accelerator.json",
                          {"boot_id": "an earlier boot", "qemu": "qemu-system-x86_64",
                           "accelerator": "kvm"},
                          lambda: accel.resolve("auto", cache_dir=cache))


def test_packer_version_cache_is_replaced_whole(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _stale_then_rewritten(tmp_path / "osimage" / "packer-version.json",
                          {"key": "another packer binary", "version": [0, 0, 1]},
                          lambda: packer._cached_version("packer"))
