"""Interactive builds: --debug (Packer's -debug and -on-error=ask) and --break-before/after.

A person steps through the build on a terminal, logs in to the VM with the command printed
(build/packer.py: LoginHints), and decides what happens on an error. Such a build is never
published nor recorded: its version carries -debug and its artifacts stay in
build/IMAGE/VERSION/output/.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from osimage import config
from osimage.build.context import BuildContext, BuildOptions
from osimage.build.feature import Feature
from osimage.config import Image
from osimage.errors import ConfigError


def check_options(image: Image, debug: bool, break_before: Sequence[str],
                  break_after: Sequence[str], has_terminal: bool | None = None) -> None:
    """Refuse what cannot work before anything starts (exit 2)."""
    shown = f"images/{image.name}/image.yaml"
    for flag, names in (("--break-before", break_before), ("--break-after", break_after)):
        for name in names:
            if name not in image.provisioner_names:
                near = difflib.get_close_matches(name, image.provisioner_names, n=1)
                hint = (f"did you mean '{near[0]}'?" if near else
                        f"the steps are: {', '.join(image.provisioner_names)}")
                raise ConfigError(f"{flag} {name}: {shown} has no provisioner named "
                                  f"'{name}' ({hint})")
    if not (debug or break_before or break_after):
        return
    if has_terminal is None:
        has_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if not has_terminal:
        what = "--debug" if debug else "--break-before/--break-after"
        raise ConfigError(f"{what} needs a terminal: Packer pauses and asks on it, and there "
                          "is none here (stdin or stdout is not a TTY)",
                          hint="run it from an interactive shell; in CI, build without it")


def _breakpoint(where: str, name: str) -> dict[str, Any]:
    return {"type": "breakpoint", "name": f"break-{where}-{name}",
            "note": f"osimage: paused {where} step '{name}'"}


class Debug(Feature):
    name = "debug"

    def check_options(self, root: Path, opts: BuildOptions) -> BuildOptions:
        if opts.break_before or opts.break_after or opts.debug:
            check_options(config.load_image(root, opts.image), opts.debug, opts.break_before,
                          opts.break_after)
        return opts

    def provisioners(self, ctx: BuildContext, provs: list[dict[str, Any]],
                     env: dict[str, str]) -> list[dict[str, Any]]:
        """A Packer breakpoint before or after each provisioner named by --break-*."""
        out: list[dict[str, Any]] = []
        for prov in provs:
            if prov.get("name") in ctx.break_before:
                out.append(_breakpoint("before", prov["name"]))
            out.append(prov)
            if prov.get("name") in ctx.break_after:
                out.append(_breakpoint("after", prov["name"]))
        return out


FEATURE = Debug()
