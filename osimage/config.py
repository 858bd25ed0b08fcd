"""Load and validate image.yaml and site.yaml against their JSON schemas.

Every problem is reported at once, each naming the file, the key path and, for a misspelt
key, the nearest valid one.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from osimage.errors import ConfigError

SCHEMA_DIR = Path(__file__).parent / "schemas"
IMAGE_NAME = re.compile(r"\A[a-z0-9][a-z0-9._-]*\Z")  # whole: no trailing newline

DEFAULT_SITE: dict[str, Any] = {
    "backend": "qemu",
    "build_dir": "build",
    "packer": {"binary": "packer"},
    "qemu": {"accelerator": "auto", "binary": "qemu-system-x86_64", "headless": True},
    "mirror": {"url": "mirror"},
}


@dataclass(frozen=True)
class Site:
    path: Path | None
    data: dict[str, Any]

    @property
    def backend(self) -> str:
        return str(self.data["backend"])

    @property
    def packer_binary(self) -> str:
        return str(self.data["packer"]["binary"])

    @property
    def mirror_url(self) -> str:
        return str(self.data["mirror"]["url"])

    @property
    def build_dir(self) -> str:
        return str(self.data["build_dir"])


@dataclass(frozen=True)
class Image:
    name: str
    directory: Path
    data: dict[str, Any]
    provisioner_names: list[str] = field(default_factory=list)


@cache
def load_schema(name: str) -> dict[str, Any]:
    with (SCHEMA_DIR / f"{name}.schema.json").open() as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def display_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def read_yaml(path: Path, shown: str) -> Any:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read: {e.strerror}") from None
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        raise yaml_error(shown, e) from None


def yaml_error(shown: str, e: Exception) -> ConfigError:
    """One line for a YAML file that does not parse: FILE:LINE:COLUMN: not valid YAML: why."""
    from ruamel.yaml.error import MarkedYAMLError

    if isinstance(e, MarkedYAMLError):
        mark = e.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        return ConfigError(f"{shown}{where}: not valid YAML: {e.problem}")
    return ConfigError(f"{shown}: not valid YAML: {e}")


def _key_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _schema_at(schema: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
    node = schema
    for p in parts:
        if isinstance(p, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(p, {})
    return node


def enum_message(where: str, value: Any, choices: list[Any]) -> str:
    """'key: value is not one of ...', with the nearest choice for a misspelling."""
    listed = ", ".join(repr(c) for c in choices)
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"{where}: {value!r} is not one of {listed}{hint}"


def _format_error(err: Any, schema: dict[str, Any]) -> list[str]:
    """Turn one jsonschema error into user lines: 'key.path: what is wrong'."""
    parts = list(err.absolute_path)
    where = _key_path(parts)
    v = err.validator
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        lines = []
        for key in extra:
            near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = (f" (did you mean '{near[0]}'?)" if near
                    else f" (valid keys: {', '.join(allowed)})")
            lines.append(f"{_key_path([*parts, key])}: unknown key '{key}'{hint}")
        return lines
    if v == "required":
        missing = re.findall(r"'([^']+)' is a required property", err.message)
        key = missing[0] if missing else err.message
        return [f"{_key_path([*parts, key])}: missing required key '{key}'"]
    if v == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        got = type(err.instance).__name__
        got = {"str": "string", "int": "integer", "dict": "mapping", "list": "list",
               "NoneType": "nothing", "bool": "boolean", "float": "number"}.get(got, got)
        return [f"{where}: must be {'an' if want[0] in 'aeiou' else 'a'} {want}, not {got}"]
    if v == "enum":
        return [enum_message(where, err.instance, err.validator_value)]
    if v == "pattern":
        hint = (err.schema.get("x-hint") or _schema_at(schema, parts).get("x-hint")
                or f"must match {err.validator_value}")
        return [f"{where}: {err.instance!r} is not valid: {hint}"]
    if v in ("oneOf", "anyOf") and isinstance(err.instance, dict):
        if parts == ["source"] or (parts and parts[-1] == "source") or parts[:1] == ["sources"]:
            return [f"{where}: give exactly one of 'iso' or 'disk'"]
        if parts and parts[0] == "provisioners":
            return [f"{where}: a shell provisioner needs exactly one of 'script' or 'inline'"]
    if v in ("minimum", "maximum", "minLength", "minItems"):
        return [f"{where}: {err.message}"]
    return [f"{where}: {err.message}"]


def _valid_cache() -> Path:
    from osimage.build.accel import cache_home

    return cache_home() / "valid-config"


def _typed(value: Any) -> Any:
    """value as JSON that keeps every type: a YAML date and the string '2024-01-01', 1 and
    1.0 and True, a key 1 and a key '1' all come out different, as jsonschema sees them."""
    if isinstance(value, dict):
        items = [[_typed(k), _typed(v)] for k, v in value.items()]
        return ["map", sorted(items, key=lambda kv: json.dumps(kv[0]))]
    if isinstance(value, list | tuple):
        return [type(value).__name__, [_typed(v) for v in value]]
    if value is None or isinstance(value, str | int | float):  # bool is an int: named below
        return [type(value).__name__, value]
    return [f"{type(value).__module__}.{type(value).__qualname__}", repr(value)]


def _validation_key(data: Any, schema_name: str) -> str:
    import hashlib

    schema_bytes = (SCHEMA_DIR / f"{schema_name}.schema.json").read_bytes()
    blob = json.dumps(_typed(data), sort_keys=True).encode()
    return hashlib.sha256(schema_bytes + b"\0" + blob).hexdigest()


def validate(data: Any, schema_name: str, shown: str) -> None:
    """Check data against a schema; raise one ConfigError listing every problem.

    A document that passed is remembered by the hash of its content (with the type of every
    value) and of the schema, so the next build of an unchanged image skips importing
    jsonschema (a tenth of a second).
    """
    if data is None:
        data = {}
    key = _validation_key(data, schema_name)
    marker = _valid_cache() / key
    if marker.exists():
        return
    import jsonschema

    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)),
                                                                 e.validator))
    lines: list[str] = []
    for err in errors:
        # The if/then branches of a provisioner repeat what 'required' says; keep the inner error.
        for line in _format_error(err, schema):
            if line not in lines:
                lines.append(line)
    if lines:
        first, *rest = (f"{shown}: {line}" for line in lines)
        extra = f" (and {len(rest)} more problem{'s' if len(rest) > 1 else ''})" if rest else ""
        raise ConfigError(first + extra, hint="\n".join(rest) if rest else None)
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_site(root: Path, site_file: Path | None) -> Site:
    """The site file given with --site, else site.yaml at the root, else the embedded defaults."""
    path = site_file if site_file is not None else root / "site.yaml"
    if site_file is None and not path.exists():
        return Site(path=None, data=copy.deepcopy(DEFAULT_SITE))
    shown = display_path(path, root)
    data = read_yaml(path, shown)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: (top level): must be a mapping of settings")
    validate(data, "site", shown)
    _check_mirror_url(data, root, shown)
    return Site(path=path, data=_merge(DEFAULT_SITE, data))


def _check_mirror_url(data: dict[str, Any], root: Path, shown: str) -> None:
    """A mirror.url the build could not publish to is a configuration error, found before
    anything runs (the embedded default folder is made on first use)."""
    url = data.get("mirror", {}).get("url")
    if url is None:
        return
    from osimage.publish.mirrorurl import check_url

    try:
        check_url(str(url), root)
    except ConfigError as e:
        raise ConfigError(f"{shown}: {e.message}", e.hint) from None


def list_images(root: Path) -> list[str]:
    images = root / "images"
    if not images.is_dir():
        return []
    return sorted(p.name for p in images.iterdir() if (p / "image.yaml").is_file())


def image_paths(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Every local path image.yaml names: (key, value, True when relative to the image folder,
    False when relative to the repository root). URLs are not paths."""
    found: list[tuple[str, str, bool]] = []
    for i, prov in enumerate(data.get("provisioners", [])):
        found += [(f"provisioners[{i}].{k}", prov[k], True)
                  for k in ("script", "source", "playbook") if k in prov]
    if "http_directory" in data:
        found.append(("http_directory", data["http_directory"], True))
    for step in ("apply", "create"):
        spec = data.get("patches", {}).get(step, {})
        if "script" in spec:
            found.append((f"patches.{step}.script", spec["script"], True))
    rootfs = data.get("outputs", {}).get("rootfs", {})
    if "script" in rootfs:
        found.append(("outputs.rootfs.script", rootfs["script"], True))
    src = data.get("source", {})
    for key in ("iso", "disk", "prepare"):
        if key in src and "://" not in src[key]:
            found.append((f"source.{key}", src[key], False))
    ref = src.get("checksum", "").removeprefix("file:")
    if src.get("checksum", "").startswith("file:") and "://" not in ref:
        found.append(("source.checksum", ref, False))
    return found


def check_image_paths(root: Path, directory: Path, data: dict[str, Any], shown: str) -> None:
    """Paths stay inside the image folder (the source's, inside the repository), once symlinks
    and '..' are resolved: a build reads nothing the repository does not hold, and the inputs
    hash (the image folder, templates/, the source's checksum and prepare script) covers it."""
    for key, value, in_image in image_paths(data):
        base = directory if in_image else root
        where = (f"images/{directory.name}/" if in_image else "the repository")
        target = (base / value).resolve()
        if Path(value).is_absolute() or not target.is_relative_to(base.resolve()):
            raise ConfigError(f"{shown}: {key}: {value!r} is outside {where} (paths are "
                              f"relative to {where} and must stay inside it)")


def check_parent(root: Path, name: str, data: dict[str, Any], shown: str) -> None:
    """An image starts from exactly one of a source or a parent image (a layer on it: README,
    "Layered images"); the parent is an image folder, and no image is its own ancestor."""
    if ("source" in data) == ("parent" in data):
        both = "both" if "source" in data else "neither"
        raise ConfigError(f"{shown}: source: give exactly one of 'source' or 'parent' "
                          f"({both} given)")
    seen = [name]
    parent = data.get("parent")
    while parent is not None:
        where = f"images/{seen[-1]}/image.yaml"
        if parent in seen:
            raise ConfigError(f"{shown}: parent: a cycle: {' -> '.join([*seen, parent])}")
        if not (root / "images" / parent / "image.yaml").is_file():
            raise ConfigError(f"{where}: parent: no image folder images/{parent}/ "
                              f"(known images: {', '.join(list_images(root)) or 'none'})")
        seen.append(parent)
        above = read_yaml(root / "images" / parent / "image.yaml", f"images/{parent}/image.yaml")
        parent = above.get("parent") if isinstance(above, dict) else None


def load_image(root: Path, name: str) -> Image:
    known = list_images(root)
    if not IMAGE_NAME.match(name) or name not in known:
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = (f"did you mean '{near[0]}'?" if near
                else f"known images: {', '.join(known) or 'none'}")
        raise ConfigError(f"unknown image '{name}': no images/{name}/image.yaml ({hint})")
    directory = root / "images" / name
    shown = f"images/{name}/image.yaml"
    data = read_yaml(directory / "image.yaml", shown)
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: (top level): must be a mapping of settings")
    validate(data, "image", shown)
    names = [p["name"] for p in data["provisioners"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{shown}: provisioners: name '{dupes[0]}' is used twice")
    check_image_paths(root, directory, data, shown)
    check_parent(root, name, data, shown)
    for i, prov in enumerate(data["provisioners"]):
        for key in ("script", "source", "playbook"):
            if key in prov and not (directory / prov[key]).exists():
                raise ConfigError(
                    f"{shown}: provisioners[{i}].{key}: {prov[key]!r} does not exist in "
                    f"images/{name}/"
                )
    if "http_directory" in data and not (directory / data["http_directory"]).is_dir():
        raise ConfigError(f"{shown}: http_directory: {data['http_directory']!r} is not a folder "
                          f"in images/{name}/")
    src = data.get("source", {})
    if "prepare" in src and not (root / src["prepare"]).is_file():
        raise ConfigError(f"{shown}: source.prepare: {src['prepare']!r} does not exist")
    return Image(name=name, directory=directory, data=data, provisioner_names=names)
