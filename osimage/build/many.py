"""./build.py all [IMAGE...]: each selected image built in order (osimage/build/plan.py) as
`./build.py IMAGE` builds it (same steps, locks and output; an up-to-date image is reused),
the images that need a failed one skipped while the others go on, and a table at the end.
Exit 1 when an image failed; Ctrl-C stops the running build and starts no other (130)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from osimage import runner
from osimage.build import gitstate, pipeline, plan, uptodate
from osimage.build.context import BuildOptions
from osimage.errors import BuildError, FactoryError, Interrupted
from osimage.ui import Reporter, table


@dataclass(frozen=True)
class Outcome:
    image: str
    result: str  # built, up to date, failed, skipped, not built, not started
    detail: str = ""
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("built", "up to date", "not built")

    def row(self) -> tuple[str, str, str]:
        text = f"{self.result}: {self.detail}" if self.detail else self.result
        return self.image, text, "-" if self.seconds is None else f"{self.seconds:.1f} s"


def _build_one(root: Path, opts: BuildOptions, reporter: Reporter) -> Outcome:
    t0 = time.monotonic()
    try:
        ctx = pipeline.run_build(root, opts, reporter)
    except FactoryError as e:
        stop = runner.interruption()
        if stop is not None:  # a build that a Ctrl-C made fail was interrupted
            raise stop from None
        reporter.error(e.message, e.hint)
        return Outcome(opts.image, "failed", e.message.splitlines()[0],
                       time.monotonic() - t0)
    reused = ctx.state.get(uptodate.REUSED)
    if reused is not None:
        return Outcome(opts.image, "up to date", f"build {reused}", time.monotonic() - t0)
    return Outcome(opts.image, "built", ctx.version, time.monotonic() - t0)


def _blocked(node: plan.Node, done: dict[str, Outcome]) -> str | None:
    """Why the image is skipped: what it needs did not come out right."""
    for need in node.needs:
        if not done[need].ok:
            return f"{node.relation(need)} {need} {done[need].result}"
    return None


def build_all(root: Path, names: tuple[str, ...], base: BuildOptions, reporter: Reporter,
              echo: Any) -> int:
    """Build the selected images in order; echo the summary table; 0, or raise BuildError
    (exit 1) when one failed, Interrupted (130) on Ctrl-C."""
    nodes = plan.select(root, names, lambda name: replace(base, image=name))
    gitstate.require_clean(gitstate.read_state(root), base.skip_commit)
    todo = [n for n in nodes if n.refused is None]
    reporter.info(f"building {len(todo)} image{'s' if len(todo) != 1 else ''} in this order: "
                  f"{', '.join(n.name for n in todo) or 'none'}")
    done: dict[str, Outcome] = {}
    stopped: Interrupted | None = None
    with runner.forwarded_signals():
        for node in nodes:
            if node.refused is not None:
                done[node.name] = Outcome(node.name, "not built", node.refused)
                continue
            stopped = stopped or runner.interruption()
            blocked = _blocked(node, done)
            if stopped is not None:
                done[node.name] = Outcome(node.name, "not started", "interrupted")
            elif blocked is not None:
                done[node.name] = Outcome(node.name, "skipped", blocked)
                reporter.warn(f"{node.name} skipped: {blocked}")
            else:
                reporter.info(f"=== {node.name} ({todo.index(node) + 1} of {len(todo)})")
                try:
                    done[node.name] = _build_one(root, replace(base, image=node.name), reporter)
                except Interrupted as e:
                    stopped = e
                    done[node.name] = Outcome(node.name, "interrupted")
    for line in table(["image", "result", "time"], [o.row() for o in done.values()]):
        echo(line)
    if stopped is not None:
        raise stopped
    failed = [o.image for o in done.values() if o.result == "failed"]
    skipped = [o.image for o in done.values() if o.result == "skipped"]
    if failed:
        also = f"; skipped: {', '.join(skipped)}" if skipped else ""
        raise BuildError(f"{len(failed)} of {len(todo)} images failed: {', '.join(failed)}{also}")
    return 0
