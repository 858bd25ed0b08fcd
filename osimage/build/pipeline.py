"""A build as a flat list of named steps; each is printed with its time.

The list is the core steps (osimage/build/steps.py), the backend's steps in and around their
slots (osimage/backends/), and each feature's (osimage/features/registry.py), assembled per
build by osimage/build/feature.py. Resources (the work folder's lock, the temporary SSH key,
Packer's output, the hypervisor's domain) are registered in one ExitStack as they are made, so
a failure or an interrupt anywhere cleans up the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from osimage import config, runner
from osimage.backends.registry import backend_of
from osimage.build import gitstate, packer, render
from osimage.build.context import BuildContext, BuildOptions
from osimage.build.feature import Step, assemble, select
from osimage.build.steps import CORE
from osimage.build.uptodate import UpToDate
from osimage.errors import FactoryError
from osimage.features.registry import FEATURES
from osimage.fsutil import waiting_lock
from osimage.ui import Reporter

# --- preparing -------------------------------------------------------------------------------


def check_options(root: Path, opts: BuildOptions) -> BuildOptions:
    """Every feature's say on the options, before anything is read or printed (exit 2)."""
    for feature in FEATURES:
        opts = feature.check_options(root, opts)
    return opts


def prepare(root: Path, opts: BuildOptions, reporter: Reporter) -> BuildContext:
    """Everything checked before a build may start: config, image, git state, version."""
    # Nothing is printed before the configuration is known to be good.
    site = config.load_site(root, opts.site_file)
    image = config.load_image(root, opts.image)
    state = gitstate.read_state(root)
    gitstate.require_clean(state, opts.skip_commit)
    version = gitstate.version_for(state, opts.release,
                                   suffix="-debug" if opts.interactive else "")
    packer.check_version(site.packer_binary)
    build_dir = Path(site.build_dir)
    if not build_dir.is_absolute():
        build_dir = root / build_dir
    ctx = BuildContext(root=root, image=image, site=site, git=state, version=version,
                       release=opts.release, work_dir=build_dir / image.name / version,
                       keep_failed=opts.keep_failed, reporter=reporter, debug=opts.debug,
                       break_before=list(opts.break_before), break_after=list(opts.break_after))
    ctx.replace = opts.replace
    ctx.create_patches = opts.create_patches
    ctx.accept_new_host_key = opts.accept_new_host_key
    ctx.rebuild = opts.rebuild
    reporter.info(f"    image {image.name}, version {version}, commit {state.short}"
                  f"{' (dirty)' if state.dirty else ''}")
    if state.dirty:
        reporter.warn(f"building from a dirty tree ({len(state.dirty_files)} changed "
                      f"files): the version is marked -dirty")
    return ctx


@contextlib.contextmanager
def work_dir_lock(ctx: BuildContext, reporter: Reporter) -> Iterator[None]:
    """One build at a time per image version: a second build of the same version waits."""
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    lock = Path(str(ctx.work_dir) + ".lock")
    with waiting_lock(lock, lambda: reporter.info(
            f"    waiting for the other build of {ctx.image.name} {ctx.version} ({lock})")):
        yield


def plan(ctx: BuildContext, opts: BuildOptions) -> list[Step]:
    """This build's steps: the core ones, the backend's and every feature's, less what the
    options and the features leave out."""
    added = [s for f in FEATURES for s in f.steps(ctx)]
    added += backend_of(ctx).steps
    skipped = {slot for f in FEATURES for slot in f.skips(ctx)}
    return select(assemble(CORE, added, skipped), opts)


def start(root: Path, opts: BuildOptions, reporter: Reporter) -> BuildContext:
    """The build's context, once the options, the configuration and the features agree."""
    ctx = prepare(root, check_options(root, opts), reporter)
    for feature in FEATURES:
        feature.start(ctx, opts)
    return ctx


def _run(ctx: BuildContext, steps: list[Step], stack: contextlib.ExitStack) -> None:
    for step in steps:
        runner.check_interrupted()
        done: UpToDate | None = None
        with ctx.reporter.step(step.name):
            try:
                step.run(ctx, stack)
            except UpToDate as e:  # the check's answer, not its failure: the step is ok
                done = e
        if done is not None:
            raise done


def run_build(root: Path, opts: BuildOptions, reporter: Reporter) -> BuildContext:
    t0 = time.monotonic()
    checker = render.HCLChecker()
    with runner.forwarded_signals(), contextlib.closing(checker):
        ctx = start(root, opts, reporter)
        ctx.hcl_checker = checker
        steps = plan(ctx, opts)
        # checks that may refuse the build run before it takes the work dir: a refused build
        # leaves nothing behind
        try:
            with contextlib.ExitStack() as stack:
                _run(ctx, [s for s in steps if s.check], stack)
        except UpToDate as done:
            reporter.info(str(done))
            return ctx
        with work_dir_lock(ctx, reporter), contextlib.ExitStack() as stack:
            _run(ctx, [s for s in steps if not s.check], stack)
    if opts.interactive:
        reporter.info(f"debug build of {ctx.image.name} {ctx.version} done in "
                      f"{time.monotonic() - t0:.1f} s: {ctx.output_dir} (not published, "
                      "not recorded)")
        return ctx
    reporter.info(f"built {ctx.image.name} {ctx.version} in {time.monotonic() - t0:.1f} s: "
                  f"{', '.join(ctx.mirror_paths[::2]) or ctx.output_dir}")
    return ctx


def render_only(root: Path, opts: BuildOptions, reporter: Reporter) -> Path:
    """./build.py render IMAGE: render and validate, no build; the git tree may be dirty."""
    opts.skip_commit = True
    opts.render_only = True
    with runner.forwarded_signals():
        ctx = start(root, opts, reporter)
        with work_dir_lock(ctx, reporter), contextlib.ExitStack() as stack:
            _run(ctx, plan(ctx, opts), stack)
    assert ctx.hcl_file is not None
    return ctx.hcl_file


__all__ = ["BuildOptions", "FactoryError", "render_only", "run_build"]
