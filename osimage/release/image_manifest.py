"""images/NAME/manifest.json: every build of the image, in Packer's manifest format.

Written atomically under a lock, so concurrent builds or a kill -9 never leave it corrupt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from osimage.errors import ConfigError
from osimage.fsutil import atomic_write_text, waiting_lock

LOCK_TIMEOUT = 120.0


def lock_path(path: Path) -> Path:
    return Path(str(path) + ".lock")


def read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"builds": [], "last_run_uuid": ""}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("builds"), list):
        raise ConfigError(f"{path}: builds: missing or not a list (not a Packer manifest)")
    return data


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def update(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Read, change and atomically rewrite the manifest while holding its lock."""
    with waiting_lock(lock_path(path), timeout=LOCK_TIMEOUT, what=str(path)):
        # Under the lock, a temp file can only be left by a writer that was killed.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        new = change(read(path))
        atomic_write_text(path, dumps(new))
        return new


def append_build(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    def add(data: dict[str, Any]) -> dict[str, Any]:
        data["builds"].append(entry)
        data["last_run_uuid"] = entry["packer_run_uuid"]
        return data

    return update(path, add)
