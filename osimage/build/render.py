"""Render an image's Packer HCL from templates/ and check it: python-hcl2, then packer validate.

What a user wrote reaches the VM as written. Every value a template prints is an HCL string
literal (the environment's finalize escapes what no filter did, comments included). Packer then
expands `{{ ... }}` (Go templates) in nearly every provisioner and builder setting, some of them
twice (inline, file paths, extra_arguments), so no escape survives every field: a value holding
`{{` is refused unless it is in a field documented as a Packer template (boot_command), and the
values that may hold anything (environment values, inline commands, Ansible variables) go to
Packer as files it uploads without reading: see provision_files.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
from functools import cache
from pathlib import Path
from typing import Any

from osimage.errors import BuildError, ConfigError

_TEMPLATE_SEQ = re.compile(r"([$%])\{")
_PLAIN = re.compile(r"[A-Za-z0-9 ._+:/@=,()-]*")
# HCL knows \n \r \t \" \\ and \uNNNN; JSON's \b and \f would not parse.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
# Fields Packer reads as Go templates by design: the image's boot_command (documented as one)
# and the execute_command osimage writes itself.
PACKER_TEMPLATES = frozenset({"boot_command", "execute_command"})
# Where a shell provisioner's environment file is uploaded in the VM (Packer's remote_folder).
REMOTE_ENV = "/tmp/osimage-env-{index}.sh"


class Literal(str):
    """Text that is HCL already (a filter's output): finalize prints it as it is."""


def hcl_value(value: Any) -> str:
    """A Python value as an HCL literal. HCL strings are JSON strings in which ${ and %{ start
    template sequences; their $ and % are written \\u0024 and \\u0025, which HCL decodes after
    it has looked for templates. (HCL's own $${ and %%{ would do for Packer, but python-hcl2
    8.1 keeps them as they are, and fails on a $${ without a closing brace.)"""
    if isinstance(value, str):
        body = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f"
                                           else c) for c in value)
        return '"' + _TEMPLATE_SEQ.sub(lambda m: f"\\u{ord(m.group(1)):04x}{{", body) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hcl_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{hcl_value(str(k))} = {hcl_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    if value is None:
        return "null"
    raise TypeError(f"no HCL literal for {type(value).__name__}")


def hcl_comment(value: Any) -> str:
    """Text for a # comment: as it is when it is plain, else as an HCL literal (one line)."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else hcl_value(text)


def _finalize(value: Any) -> str:
    return value if isinstance(value, Literal) else hcl_value(value)


@cache
def environment(templates: Path) -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - the output is HCL: finalize makes every value a literal
        finalize=_finalize,
    )
    env.filters["hcl"] = lambda value: Literal(hcl_value(value))
    env.filters["comment"] = lambda value: Literal(hcl_comment(value))
    return env


def check_packer_literals(value: Any, template: str, where: str = "") -> None:
    """Refuse a `{{` that Packer would expand, anywhere but in a field that is a template.
    The message names the template variable and shows the value (repr: one line)."""
    if isinstance(value, str):
        if "{{" in value:
            raise ConfigError(f"templates/{template}: {where}: {value!r} holds '{{{{', which "
                              f"Packer would expand as a template (only boot_command is one)",
                              hint="rename or move what holds it")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise ConfigError(f"templates/{template}: {where}: {value!r} is not valid Unicode")
    elif isinstance(value, dict):
        for k, v in value.items():
            if str(k) not in PACKER_TEMPLATES:
                check_packer_literals(str(k), template, where)
                check_packer_literals(v, template, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_packer_literals(v, template, f"{where}[{i}]")


def _write(path: Path, text: str, provisioner: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"provisioner '{provisioner}': {e.object[e.start:e.end]!r} in its "
                          f"environment or commands is not valid Unicode") from None
    path.write_bytes(data)


def provision_files(provisioners: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Write what Packer must not read as a template into folder, for it to upload as it is:
    each shell provisioner's environment as a file of shell-quoted exports (sourced by its
    execute_command), inline commands as a script, an Ansible provisioner's variables as JSON
    marked unsafe (Ansible would otherwise expand `{{ }}` in them too)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out: list[dict[str, Any]] = []
    for index, prov in enumerate(provisioners):
        p = dict(prov)
        p.pop("environment", None)  # image.yaml's, already in env_list
        env = [item.partition("=")[::2] for item in p.pop("env_list", [])]
        stem = f"{index:02d}-{p['name']}"
        if p["type"] == "shell":
            if "inline" in p:
                script = folder / f"{stem}.sh"
                _write(script, "#!/bin/sh -e\n" + "".join(f"{c}\n" for c in p.pop("inline")),
                       p["name"])
                p.update(script=str(script), binary=True)
            env_file = folder / f"{stem}.env"
            _write(env_file, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env),
                   p["name"])
            remote = REMOTE_ENV.format(index=index)
            p.update(env_file=str(env_file), env_dest=remote,
                     execute_command=f"chmod +x {{{{.Path}}}}; . {remote}; rm -f {remote}; "
                                     f"{{{{.Vars}}}} {{{{.Path}}}}")
        elif p["type"] == "ansible":
            variables = folder / f"{stem}.json"
            _write(variables, json.dumps({k: {"__ansible_unsafe": v} for k, v in env},
                                         indent=1, ensure_ascii=False) + "\n", p["name"])
            p["extra_vars_file"] = str(variables)
        out.append(p)
    return out


def render(templates: Path, template: str, variables: dict[str, Any]) -> str:
    import jinja2

    check_packer_literals(variables, template)
    try:
        return str(environment(templates).get_template(template).render(**variables))
    except jinja2.TemplateNotFound as e:
        raise ConfigError(f"templates/{e.name}: template not found") from None
    except jinja2.UndefinedError as e:
        raise ConfigError(f"templates/{template}: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"templates/{e.name or template}:{e.lineno}: {e.message}") from None


def parse_hcl(text: str, shown: str, explicit_blocks: bool = False) -> dict[str, Any]:
    """Parse rendered HCL with python-hcl2; a template bug shows up here, before Packer runs.
    explicit_blocks marks blocks (__is_block__), so a block and an object attribute differ."""
    import hcl2

    options = hcl2.SerializationOptions(strip_string_quotes=True,
                                        explicit_blocks=explicit_blocks, with_comments=False)
    try:
        parsed: dict[str, Any] = hcl2.loads(text, serialization_options=options)
    except Exception as e:  # python-hcl2 raises lark errors of many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BuildError(f"{shown}: the rendered HCL does not parse: {first}",
                         hint="this is a bug in templates/; render it with "
                              "'./build.py render IMAGE' and read the file") from None
    return parsed


def sources_of(parsed: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, name) of each source block in parsed HCL."""
    found: list[tuple[str, str]] = []
    for block in parsed.get("source", []):
        for kind, named in block.items():
            for name in named:
                found.append((kind.strip('"'), name.strip('"')))
    return found


# A Ctrl-C reaches the terminal's whole process group, the helper included: it must not answer
# with a KeyboardInterrupt traceback. The build ends the helper itself (HCLChecker.close).
_HELPER_IGNORES = {signal.SIGINT, signal.SIGHUP}


def _checker_main(conn: Any) -> None:
    for sig in _HELPER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELPER_IGNORES)
    import hcl2.parser

    hcl2.parser.parser()
    while True:
        try:
            text, shown = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, parse_hcl(text, shown)))
        except BuildError as e:
            conn.send((False, e))


class HCLChecker:
    """python-hcl2 in a forked helper process that starts with the build.

    Loading python-hcl2's grammar costs about 0.2 s of CPU; in a process of its own it overlaps
    the configuration checks instead of adding to every build's wall time. The helper is
    killed, not asked to exit, since tearing down the parser's objects takes another 0.15 s.
    """

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_checker_main, args=(child,), daemon=True)
        # blocked across the fork, so no signal reaches the helper before it ignores them
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELPER_IGNORES)
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELPER_IGNORES)
        child.close()

    def parse(self, text: str, shown: str) -> dict[str, Any]:
        try:
            self._conn.send((text, shown))
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            return parse_hcl(text, shown)
        if not ok:
            raise value
        parsed: dict[str, Any] = value
        return parsed

    def close(self) -> None:
        self._conn.close()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
