"""The qemu backend: Packer's qemu builder on this machine (templates/qemu.pkr.hcl.j2).

Its only step of its own renders the template and validates it twice at once (packer validate
and python-hcl2); Packer writes the disk into build/IMAGE/VERSION/output/, which the core
"hash artifacts" step hashes."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from osimage.build import accel, inputs, packer, render
from osimage.build import steps as core
from osimage.build.context import BuildContext
from osimage.build.feature import Step
from osimage.errors import BuildError


def step_render(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    qemu = ctx.site.data["qemu"]
    ctx.accelerator = accel.resolve(qemu["accelerator"], qemu["binary"])
    text = render.render(ctx.root / "templates", "qemu.pkr.hcl.j2", variables(ctx))
    hcl = ctx.work_dir / f"{ctx.image.name}.pkr.hcl"
    core.fresh_output(ctx, hcl, text)
    # packer validate runs while python-hcl2 parses the same text: two checks, one wait.
    with ThreadPoolExecutor(max_workers=1) as pool:
        validated = pool.submit(packer.validate, ctx.site.packer_binary, hcl, ctx.work_dir)
        try:
            shown = str(hcl.relative_to(ctx.root))
            parsed = (ctx.hcl_checker.parse(text, shown) if ctx.hcl_checker is not None
                      else render.parse_hcl(text, shown))
            if not render.sources_of(parsed):
                raise BuildError(f"{hcl}: the rendered HCL has no source block")
            ctx.inputs_sha256 = core.inputs_hash(ctx)
        finally:
            validated.exception()  # wait for it; a parse error is the clearer message
        validated.result()
    ctx.reporter.info(f"    rendered {hcl.relative_to(ctx.root)} (accelerator {ctx.accelerator})")


def variables(ctx: BuildContext) -> dict[str, Any]:
    """The template's variables; a source that is a backing file (a parent image's disk)
    is not copied: the VM writes to a qcow2 overlay over it (flattened after the build)."""
    base = core.template_variables(ctx)
    backing = inputs.source_of(ctx)[0].get("backing_format")
    if backing is None:
        return base
    return {**base, "backing_format": backing, "format": "qcow2",
            "vm_name": f"{ctx.image.name}.qcow2"}


class Qemu:
    name = "qemu"
    steps = (Step("render and validate HCL", step_render, slot="render"),)
    artifact_in_output_dir = True


BACKEND = Qemu()
