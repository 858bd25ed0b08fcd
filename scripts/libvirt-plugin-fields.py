#!/usr/bin/env python3
"""Compare osimage/schemas/libvirt-plugin.schema.json with a checkout of the plugin.

    python scripts/libvirt-plugin-fields.py PLUGIN_DIR SDK_DIR

PLUGIN_DIR is a checkout of github.com/thomasklein94/packer-plugin-libvirt at the version to
move to, SDK_DIR one of github.com/hashicorp/packer-plugin-sdk at the version the plugin's
go.mod names (the communicator block comes from it). Reads the HCL2Spec() tables of the
generated *.hcl2spec.go files (what Packer really decodes) and prints, block by block, the
fields the schema lacks and the fields it has that the plugin does not; exit 1 if any.
Then update the schema (fields, x-plugin version, $comment) and its tests.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SCHEMA = Path(__file__).resolve().parent.parent / "osimage" / "schemas" / \
    "libvirt-plugin.schema.json"
# schema block -> (repository, generated file, Flat struct)
SOURCES = {
    "Config": ("plugin", "builder/libvirt/generate.hcl2spec.go", "FlatConfig"),
    "DomainGraphic": ("plugin", "builder/libvirt/generate.hcl2spec.go", "FlatDomainGraphic"),
    "NetworkInterface": ("plugin", "builder/libvirt/network/generate.hcl2spec.go",
                         "FlatNetworkInterface"),
    "Volume": ("plugin", "builder/libvirt/volume/generate.hcl2spec.go", "FlatVolume"),
    "VolumeSource": ("plugin", "builder/libvirt/volume/generate.hcl2spec.go",
                     "FlatVolumeSource"),
    "communicator": ("sdk", "communicator/config.hcl2spec.go", "FlatConfig"),
}
_SPEC = re.compile(r"func \(\*(Flat\w+)\) HCL2Spec\(\) map\[string\]hcldec\.Spec \{\n"
                   r"\ts := map\[string\]hcldec\.Spec\{\n(.*?)\n\t\}", re.S)
_FIELD = re.compile(r'"(\w+)":\s*&hcldec\.(\w+)\{(.*)\}')
_CTY = {"cty.String": "string", "cty.Number": "number", "cty.Bool": "boolean",
        "cty.List(cty.String)": "array", "cty.List(cty.Number)": "array",
        "cty.Map(cty.String)": "object"}


def spec_fields(path: Path, struct: str) -> dict[str, str]:
    """field -> JSON type ('array' for blocks too) of one Flat struct's HCL2Spec table."""
    for m in _SPEC.finditer(path.read_text()):
        if m.group(1) != struct:
            continue
        out = {}
        for name, kind, body in _FIELD.findall(m.group(2)):
            t = re.search(r"Type: (cty\.[\w.()]+)", body)
            out[name] = "array" if kind.startswith("Block") else _CTY.get(t[1] if t else "", "?")
        return out
    raise SystemExit(f"{path}: no {struct}.HCL2Spec()")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    roots = {"plugin": Path(argv[0]), "sdk": Path(argv[1])}
    schema = json.loads(SCHEMA.read_text())
    differ = False
    for block, (repo, file, struct) in SOURCES.items():
        want = spec_fields(roots[repo] / file, struct)
        props = schema["$defs"][block]["properties"]
        have = {k: v.get("type", "?") for k, v in props.items() if k != "__is_block__"}
        for name in sorted(set(want) - set(have)):
            print(f"{block}: missing {name} ({want[name]})")
        for name in sorted(set(have) - set(want)):
            print(f"{block}: not in the plugin: {name}")
        for name in sorted(set(want) & set(have)):
            if want[name] != have[name]:
                print(f"{block}.{name}: type {have[name]} in the schema, {want[name]} in "
                      f"{file}")
        differ |= set(want) != set(have) or any(want[n] != have[n] for n in set(want) & set(have))
    print("the schema matches the plugin's generated specs" if not differ else
          "update osimage/schemas/libvirt-plugin.schema.json")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
