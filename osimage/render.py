"""Render an image's Packer HCL from templates/ and check it: python-hcl2, then packer validate."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

from osimage.errors import BuildError, ConfigError

_TEMPLATE_SEQ = re.compile(r"([$%])\{")
# HCL knows \n \r \t \" \\ and \uNNNN; JSON's \b and \f would not parse.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def hcl_value(value: Any) -> str:
    """A Python value as an HCL literal. HCL strings are JSON strings in which ${ and %{ start
    template sequences, so those are escaped as $${ and %%{."""
    if isinstance(value, str):
        body = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f"
                                           else c) for c in value)
        return '"' + _TEMPLATE_SEQ.sub(lambda m: m.group(1) * 2 + "{", body) + '"'
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


def environment(templates: Path) -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - the output is HCL, every value goes through |hcl
    )
    env.filters["hcl"] = hcl_value
    return env


def render(templates: Path, template: str, variables: dict[str, Any]) -> str:
    import jinja2

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
