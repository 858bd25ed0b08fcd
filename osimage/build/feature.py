"""What a build feature and a backend are to the pipeline, and how their steps join the build.

The build is a flat list of named steps (osimage/build/steps.py: CORE). Each core step fills a
slot: "check mirror", "check release", "check published", "source", "key", "render",
"packer", "artifacts", "publish", "record". A backend fills the "render" and "artifacts" slots
with its own steps and may add steps before or after any slot; a feature adds its steps the
same way (`at="after packer"`), may leave core slots out of a build (`skips`), and has its
say in the options check, the provisioners, the manifest record and the inputs hash.

Adding a feature is one module with a FEATURE object and one line in
osimage/features/registry.py; the pipeline never names a feature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from osimage.build.context import BuildContext, BuildOptions

StepFn = Callable[[BuildContext, contextlib.ExitStack], None]


@dataclass(frozen=True)
class Step:
    """One named step: printed with its time when it runs."""

    name: str
    run: StepFn
    slot: str = ""  # a core step's slot, or the slot a backend's step fills
    at: str = ""  # an added step's place: "before SLOT" or "after SLOT"
    publishes: bool = False  # reaches the mirror or the registry: not in a build that does not
    records: bool = False  # part of recording the build: not in a --debug build
    check: bool = False  # may refuse the build: runs before it takes its work folder
    needs_vm: bool = False  # only where Packer runs: not in ./build.py render


class Feature:
    """A capability of the build; every hook does nothing unless the feature overrides it."""

    name = ""  # its key in the manifest entry's custom_data and in the inputs hash
    recorded = False  # whether the manifest entry's custom_data carries `name` (null if unused)
    # whether inputs() is known only after the feature's steps ran (a fetched tarball's sha256):
    # a build with such steps is not judged up to date before it starts (build/uptodate.py)
    inputs_from_steps = False

    def check_options(self, root: Path, opts: BuildOptions) -> BuildOptions:
        """Before anything is read or printed: refuse (ConfigError) or adjust the options."""
        return opts

    def start(self, ctx: BuildContext, asked: BuildOptions) -> None:
        """The context is made: say what the feature does in this build (asked: the options
        as the command line gave them, before check_options)."""

    def steps(self, ctx: BuildContext) -> list[Step]:
        """The steps this build runs for the feature (none when the image does not use it)."""
        return []

    def skips(self, ctx: BuildContext) -> set[str]:
        """Core slots this build leaves out (a --create-patches build records no disk)."""
        return set()

    def provisioners(self, ctx: BuildContext, provs: list[dict[str, Any]],
                     env: dict[str, str]) -> list[dict[str, Any]]:
        """The provisioners with this feature's own added (env: OSIMAGE_IMAGE, ...)."""
        return provs

    def record(self, ctx: BuildContext) -> Any:
        """What the manifest entry's custom_data records under `name`."""
        return None

    def inputs(self, ctx: BuildContext) -> bytes:
        """What this feature adds to the build's inputs hash (b"": nothing)."""
        return b""


class Backend(Protocol):
    """The VM side of a build (site.yaml backend:). Its steps fill the "render" slot (render and
    validate the template) and the "artifacts" slot (collect and hash what Packer made), and
    add what it needs around them: preflight, the install source, tags and cleanup (registered
    in the build's ExitStack by the step that makes the resource). "packer" runs Packer."""

    name: str
    steps: Sequence[Step]
    # whether Packer leaves the disk in the work folder (libvirt: in a pool volume)
    artifact_in_output_dir: bool


def assemble(core: Sequence[Step], added: Sequence[Step], skipped: set[str]) -> list[Step]:
    """The build's step list: each core slot (or the backend's step that fills it), with the
    added steps before and after it in the order given; skipped slots leave only their
    neighbours."""
    fill = {s.slot: s for s in added if s.slot}
    before: dict[str, list[Step]] = {}
    after: dict[str, list[Step]] = {}
    for s in added:
        if s.slot:
            continue
        where, _, slot = s.at.partition(" ")
        if where not in ("before", "after") or not any(c.slot == slot for c in core):
            raise ValueError(f"step {s.name!r}: at={s.at!r} names no core slot")
        (before if where == "before" else after).setdefault(slot, []).append(s)
    out: list[Step] = []
    for c in core:
        out += before.get(c.slot, [])
        if c.slot not in skipped:
            out.append(fill.get(c.slot, c))
        out += after.get(c.slot, [])
    return out


def select(steps: Sequence[Step], opts: BuildOptions) -> list[Step]:
    """What the options leave of the list: a build that does not publish touches neither the
    mirror nor the registry; a debug build is neither published nor recorded; ./build.py
    render stops after the render slot and runs nothing that needs the VM or checks it."""
    out = list(steps)
    if not opts.publish or opts.interactive:
        out = [s for s in out if not s.publishes]
    if opts.interactive:
        out = [s for s in out if not s.records]
    if opts.render_only:
        upto = next(i for i, s in enumerate(out) if s.slot == "render")
        out = [s for s in out[:upto + 1] if not (s.check or s.needs_vm or s.publishes)]
    return out
