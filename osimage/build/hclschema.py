"""Check rendered HCL against a schema of a Packer plugin's fields, before Packer runs.

Packer 1.6.6 here cannot load the libvirt plugin, so `packer validate` cannot tell a field the
plugin does not know. The schema (osimage/schemas/libvirt-plugin.schema.json, made from the
plugin's generated *.hcl2spec.go files) can: python-hcl2 parses the rendered file with blocks
marked, jsonschema checks it, and every problem is reported with its path in the file,
`source.libvirt.NAME.volume[1].source.type`, and the nearest known field for a misspelt one.
Then the rules the plugin's Prepare applies across fields are checked the same way, so what
would fail a build after its domain booted fails at render time, with exit status 2.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from typing import Any

from osimage.config import SCHEMA_DIR
from osimage.errors import ConfigError

BLOCK = "__is_block__"
# Volume source types that let a volume go without size and capacity (volume.go: the sources
# that set allowUnspecifiedSize).
SIZELESS_SOURCES = {"backing-store", "backingstore", "cloning", "clone", "cloud-init",
                    "cloudinit", "external", "files"}


@cache
def load(name: str = "libvirt-plugin") -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return schema


def plugin_info(name: str = "libvirt-plugin") -> dict[str, str]:
    info: dict[str, str] = load(name)["x-plugin"]
    return info


def parse(text: str, shown: str) -> dict[str, Any]:
    """python-hcl2's parse with blocks marked (__is_block__), so a block and an attribute that
    holds an object can be told apart."""
    from osimage.build.render import parse_hcl

    return parse_hcl(text, shown, explicit_blocks=True)


def _is_block_list(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(v, dict) and v.get(BLOCK) for v in value))


def where(instance: Any, parts: list[Any]) -> str:
    """A path in HCL terms: source.libvirt.NAME.volume[1].source.type. The index of a block
    that occurs once is left out (source[0] is just source)."""
    out = ""
    node = instance
    for p in parts:
        if isinstance(p, int):
            if not (isinstance(node, list) and len(node) == 1):
                out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "(top level)"


def _known(err: Any) -> list[str]:
    return sorted(k for k in err.schema.get("properties", {}) if k != BLOCK)


def _type_name(value: Any) -> str:
    if _is_block_list(value):
        return "a block"
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean",
            dict: "an object", list: "a list", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)


def _format(err: Any, instance: Any) -> list[str]:
    parts = list(err.absolute_path)
    at = where(instance, parts)
    v = err.validator
    if v == "additionalProperties" and isinstance(err.instance, dict):
        known = _known(err)
        lines = []
        for key in sorted(set(err.instance) - set(known) - {BLOCK}):
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            lines.append(f"{where(instance, [*parts, key])}: unknown field '{key}'{hint}")
        return lines
    if v == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        if missing == [BLOCK]:
            field = parts[-2] if len(parts) >= 2 and isinstance(parts[-1], int) else at
            return [f"{where(instance, parts)}: '{field}' must be written as a block "
                    f"({field} {{ ... }}), not as an attribute ({field} = ...)"]
        return [f"{where(instance, [*parts, k])}: missing required field '{k}'"
                for k in missing if k != BLOCK]
    if v == "type":
        want = err.validator_value
        if want == "array" and isinstance(err.instance, dict) and not err.instance.get(BLOCK):
            return [f"{at}: must be written as a block, not as an attribute"]
        if _is_block_list(err.instance):
            return [f"{at}: must be an attribute ({parts[-1]} = ...), not a block"]
        return [f"{at}: must be {'an' if str(want)[0] in 'aeiou' else 'a'} {want}, "
                f"not {_type_name(err.instance)}"]
    if v == "enum":
        from osimage.config import enum_message

        return [enum_message(at, err.instance, err.validator_value)]
    if v == "pattern":
        hint = err.schema.get("x-hint") or f"must match {err.validator_value}"
        return [f"{at}: {err.instance!r} is not valid: {hint}"]
    if v == "maxItems" and _is_block_list(err.instance):
        return [f"{at}: at most {err.validator_value} block of this kind, not "
                f"{len(err.instance)}"]
    if v == "const":
        return [f"{at}: must be {err.validator_value!r}, not {err.instance!r}"]
    return [f"{at}: {err.message}"]


def _blocks(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _plugin_rules(parsed: dict[str, Any]) -> list[str]:
    """What the plugin's Prepare checks across fields (config.go, volume/volume.go)."""
    lines: list[str] = []
    for entry in _blocks(parsed.get("source")):
        for name, body in (entry.get("libvirt") or {}).items():
            base = f"source.libvirt.{name}"
            volumes = _blocks(body.get("volume"))
            if not volumes:
                lines.append(f"{base}: no volume block (the plugin needs at least one)")
            for i, vol in enumerate(volumes):
                at = f"{base}.volume[{i}]" if len(volumes) > 1 else f"{base}.volume"
                src = (_blocks(vol.get("source")) or [{}])[0]
                kind = src.get("type")
                if kind not in SIZELESS_SOURCES and "size" not in vol and "capacity" not in vol:
                    lines.append(f"{at}: needs 'capacity' or 'size' (a volume without a source "
                                 f"that sets its size must have one, even one that exists)")
                if kind == "files" and vol.get("device") not in ("cdrom", "floppy"):
                    lines.append(f"{at}: a 'files' source needs device = \"cdrom\" or "
                                 f"\"floppy\"")
                if kind in ("cloning", "clone") and not (src.get("pool") and src.get("volume")):
                    lines.append(f"{at}.source: a cloning source needs 'pool' and 'volume'")
            aliases = [v.get("alias") for v in volumes]
            artifact = body.get("artifact_volume_alias")
            if artifact is not None and artifact not in aliases:
                lines.append(f"{base}.artifact_volume_alias: no volume has alias {artifact!r}")
            elif artifact is None and "artifact" not in aliases and len(volumes) > 1:
                lines.append(f"{base}: give the artifact volume alias = \"artifact\" (or set "
                             f"artifact_volume_alias): there are {len(volumes)} volumes")
            nics = _blocks(body.get("network_interface"))
            wanted = body.get("communicator_interface")
            if wanted is not None and wanted not in [n.get("alias") for n in nics]:
                lines.append(f"{base}.communicator_interface: no network_interface has alias "
                             f"{wanted!r}")
    return lines


def check(parsed: dict[str, Any], shown: str, schema_name: str = "libvirt-plugin") -> None:
    """Raise one ConfigError listing every problem of parsed against the plugin's schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load(schema_name))
    errors = sorted(validator.iter_errors(parsed),
                    key=lambda e: ([str(p) for p in e.absolute_path], str(e.validator)))
    lines: list[str] = []
    for err in errors:
        for line in _format(err, parsed):
            if line not in lines:
                lines.append(line)
    if not lines:
        lines = _plugin_rules(parsed)
    if lines:
        first, *rest = (f"{shown}: {line}" for line in lines)
        extra = f" (and {len(rest)} more problem{'s' if len(rest) > 1 else ''})" if rest else ""
        plugin = plugin_info(schema_name)
        raise ConfigError(first + extra,
                          hint="\n".join([*rest, f"checked against the fields of "
                                          f"{plugin['source']} {plugin['version']} "
                                          f"(osimage/schemas/{schema_name}.schema.json)"]))


def check_text(text: str, shown: str) -> dict[str, Any]:
    parsed = parse(text, shown)
    check(parsed, shown)
    return parsed
