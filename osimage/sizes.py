"""Sizes: read from image.yaml and the site file ('20G'), shown to people ('1.5 GiB')."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^([0-9]+)(|B|K|KIB|M|MIB|G|GIB|T|TIB)\Z", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'20G', '512M', '1048576B' as bytes (binary units, as image.yaml and libvirt use them)."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r}")
    return int(m[1]) * _UNITS[m[2].upper()]


def human(n: float) -> str:
    """Bytes for a person: '512 B', '3.0 KiB', '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
