"""The core steps of every build, in the order CORE lists them; features and the backend add
theirs around these slots (osimage/build/feature.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from osimage import __version__, runner
from osimage.backends.registry import backend_of
from osimage.build import inputs, packer, render, uptodate
from osimage.build.context import BuildContext
from osimage.build.feature import Step
from osimage.errors import BuildError, ConfigError, FactoryError
from osimage.features.registry import FEATURES
from osimage.publish import artifacts, mirrorcheck, pending
from osimage.publish.mirrorlock import PublishRefused
from osimage.release import image_manifest as manifest
from osimage.sizes import human
from osimage.ui import Reporter

_resolve_location = inputs.resolve_location


def _run_prepare(ctx: BuildContext, script: Path, target: Path, reporter: Reporter) -> None:
    if inputs.prepared(script, target):
        return
    reporter.info(f"    making {target.name} with {script.relative_to(ctx.root)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with (ctx.work_dir / "prepare.log").open("w") as log:
        runner.run([script, target.parent], cwd=ctx.root, log=log, what=script.name)
    if not target.exists():
        raise BuildError(f"{script.relative_to(ctx.root)} did not make {target}")
    (target.parent / ".prepare-stamp").write_text(
        hashlib.sha256(script.read_bytes()).hexdigest() + "\n")


def step_source(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    src, shown, key = inputs.source_of(ctx)
    if key != "source":  # the site's local copy of the source (site.yaml: sources.IMAGE)
        ctx.reporter.info(f"    source from {shown} ({key})")
    location = src.get("disk") or src["iso"]
    if "prepare" in src:
        if "://" in location:
            raise ConfigError(f"{shown}: {key}.prepare needs a local path, not {location!r}")
        _run_prepare(ctx, ctx.root / src["prepare"], Path(_resolve_location(ctx.root, location)),
                     ctx.reporter)
    ctx.source_url = _resolve_location(ctx.root, location)
    ctx.source_checksum = inputs.source_checksum(ctx)
    if "://" not in ctx.source_url and not Path(ctx.source_url).exists():
        raise ConfigError(f"{shown}: {key}: {location} does not exist")


inputs_hash = inputs.inputs_hash  # the backends' render step records it


def step_key(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The build's temporary SSH key: made for this build only, deleted when it ends."""
    key_dir = Path(tempfile.mkdtemp(prefix=f"osimage-{ctx.image.name}-key-"))
    stack.callback(shutil.rmtree, key_dir, True)
    key = key_dir / "id_ed25519"
    runner.output(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                   f"osimage-build-{ctx.run_uuid[:8]}", "-f", str(key)], what="ssh-keygen")
    ctx.key_file = key


def template_variables(ctx: BuildContext) -> dict[str, Any]:
    data = ctx.image.data
    img_dir = ctx.image.directory
    provisioners: list[dict[str, Any]] = []
    env = {"OSIMAGE_IMAGE": ctx.image.name, "OSIMAGE_VERSION": ctx.version,
           "OSIMAGE_COMMIT": ctx.git.commit}
    for prov in data["provisioners"]:
        p = dict(prov)
        for key in ("script", "source", "playbook"):
            if key in p:
                p[key] = str(img_dir / p[key])
        merged = {**env, **prov.get("environment", {})}
        p["env_list"] = [f"{k}={v}" for k, v in sorted(merged.items())]
        provisioners.append(p)
    for feature in FEATURES:  # in the registry's order: the rootfs export comes last
        provisioners = feature.provisioners(ctx, provisioners, env)
    # environments, inline commands and Ansible variables as files Packer uploads unread
    provisioners = render.provision_files(provisioners, ctx.work_dir / "provision")
    assert ctx.key_file is not None
    qemu = ctx.site.data["qemu"]
    ssh = data.get("ssh", {})
    outputs = data["outputs"]["disk"]
    return {
        "name": ctx.image.name,
        "version": ctx.version,
        "source_url": ctx.source_url,
        "source_checksum": ctx.source_checksum,
        "disk_image": "disk" in (ctx.site.data.get("sources", {}).get(ctx.image.name)
                                 or data["source"]),
        "accelerator": ctx.accelerator,
        "qemu_binary": qemu["binary"],
        "headless": qemu["headless"],
        "memory": data["memory"],
        "cpus": data["cpus"],
        "disk_size": data["disk_size"],
        "format": outputs.get("format", "qcow2"),
        "output_dir": str(ctx.output_dir),
        "vm_name": f"{ctx.image.name}.{outputs.get('format', 'qcow2')}",
        "boot_wait": data.get("boot_wait", "5s"),
        "boot_command": data.get("boot_command", []),
        "http_directory": served_http_directory(ctx),
        "ssh_username": ssh.get("username", "root"),
        "ssh_timeout": ssh.get("timeout", "10m"),
        "ssh_key_file": str(ctx.key_file),
        "ssh_public_key_file": str(ctx.key_file) + ".pub",
        "shutdown_command": data.get("shutdown_command", "shutdown -P now"),
        "provisioners": provisioners,
        "serial_socket": str(ctx.serial_socket) if ctx.interactive else None,
        "packer_manifest": str(ctx.packer_manifest),
        "custom_data": {"image": ctx.image.name, "version": ctx.version,
                        "git_commit": ctx.git.commit},
    }


def step_packer(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    assert ctx.hcl_file is not None

    def drop_output() -> None:
        if not ctx.keep_failed:
            shutil.rmtree(ctx.output_dir, ignore_errors=True)

    # Until the artifacts are recorded, a failure must not leave a half-made output behind.
    output_guard = stack.enter_context(contextlib.ExitStack())
    output_guard.callback(drop_output)
    env = {"PACKER_LOG": "1", "PACKER_LOG_PATH": str(ctx.work_dir / "packer-debug.log"),
           "CHECKPOINT_DISABLE": "1", "PACKER_NO_COLOR": "1",
           "PACKER_CACHE_DIR": str(ctx.work_dir / "packer_cache")}
    started = time.time()
    if ctx.interactive:
        result, progress = _packer_interactive(ctx, env)
    else:
        argv = [ctx.site.packer_binary, "build", "-machine-readable"]
        if ctx.keep_failed:
            argv.append("-on-error=abort")
        argv.append(ctx.hcl_file.name)
        with ctx.log_file.open("w") as log:
            progress = packer.BuildProgress(log=log, on_step=ctx.reporter.substep)
            result = runner.run(argv, cwd=ctx.work_dir, env=env, on_line=progress.feed,
                                check=False)
    ctx.reporter.stop_substeps()
    if not result.ok:
        tail = "\n".join(progress.text_tail[-15:])
        first = progress.errors[-1].splitlines()[0] if progress.errors else "see the log"
        raise BuildError(f"packer build failed: {first} (log: {ctx.log_file})", hint=tail)
    ctx.build_time = int(started)
    ctx.artifact_id = progress.artifact_id
    found = _packer_files(ctx)
    if not found and backend_of(ctx).artifact_in_output_dir:
        raise BuildError(f"packer build made no artifact in {ctx.output_dir}")
    record = _packer_build_record(ctx)
    ctx.builder_type = str(record.get("builder_type", ctx.site.backend))
    ctx.build_time = int(record.get("build_time", ctx.build_time))
    ctx.artifact_id = str(record.get("artifact_id", ctx.artifact_id))
    ctx.artifacts = [artifacts.Artifact(path=p, size=0, sha256="") for p in found]
    output_guard.pop_all()
    stack.callback(_drop_unrecorded_output, ctx)


def _packer_interactive(ctx: BuildContext,
                        env: dict[str, str]) -> tuple[runner.Result, packer.BuildProgress]:
    """packer build on the user's terminal: -debug pauses before each step, -on-error=ask
    keeps the VM on an error until the user answers; breakpoints pause where they were put."""
    assert ctx.hcl_file is not None and ctx.key_file is not None
    argv = [ctx.site.packer_binary, "build"]
    if ctx.debug:
        argv += ["-debug", "-on-error=ask"]
    argv.append(ctx.hcl_file.name)
    hints = packer.LoginHints(user=ctx.image.data.get("ssh", {}).get("username", "root"),
                             key_file=ctx.key_file, backend=ctx.site.backend,
                             serial_socket=ctx.serial_socket)
    with ctx.log_file.open("w") as log:
        progress = packer.BuildProgress(log=log)

        def feed(line: str) -> None:
            hints.feed(line)
            if "==>" in line and "Error" in line:
                progress.errors.append(line.split("==>", 1)[-1].strip())
            progress.text_tail = [*progress.text_tail, line][-40:]

        result = runner.run_interactive(argv, cwd=ctx.work_dir, env=env, on_line=feed, log=log)
    return result, progress


def _drop_unrecorded_output(ctx: BuildContext) -> None:
    if ctx.interactive and ctx.artifacts and all(a.sha256 for a in ctx.artifacts):
        return  # a finished debug build keeps its hashed output for the user to look at
    if not ctx.mirror_paths and not ctx.keep_failed and not pending.exists(ctx.work_dir):
        shutil.rmtree(ctx.output_dir, ignore_errors=True)


def _packer_files(ctx: BuildContext) -> list[Path]:
    try:
        data = json.loads(ctx.packer_manifest.read_text())
        # a null source (libvirt driver native) records "files": null
        names = [f["name"] for b in data["builds"] for f in b["files"] or []]
    except (OSError, ValueError, KeyError):
        names = []
    paths = [Path(n) if Path(n).is_absolute() else ctx.work_dir / n for n in names]
    if not paths and ctx.output_dir.is_dir():
        paths = sorted(p for p in ctx.output_dir.iterdir() if p.is_file())
    return [p for p in paths if p.is_file()]


def _packer_build_record(ctx: BuildContext) -> dict[str, Any]:
    try:
        record: dict[str, Any] = json.loads(ctx.packer_manifest.read_text())["builds"][-1]
    except (OSError, ValueError, KeyError, IndexError):
        return {}
    return record


def step_checksums(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    ctx.artifacts = [artifacts.record(a.path) for a in ctx.artifacts]
    for a in ctx.artifacts:
        ctx.reporter.info(f"    {a.name}: {human(a.size)}, sha256 {a.sha256}")


def step_check_mirror(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """Everything the publish will need, checked now rather than after the VM has run:
    reachable, writable, room for what it will send, HTTP serving it (publish/mirrorcheck.py)."""
    mirror = ctx.mirror()
    ctx.reporter.info(f"    {mirrorcheck.check(mirror, ctx.mirror_dest, _expected_size(ctx))}")


def _expected_size(ctx: BuildContext) -> mirrorcheck.Expected | None:
    """What the publish will need: the files of the image's last recorded build, else the
    source's size (a fair first guess: the artifact is made from it); None if unknown."""
    with contextlib.suppress(ConfigError, OSError, LookupError, TypeError, ValueError):
        builds = manifest.read(ctx.image_manifest)["builds"]
        size = sum(int(f["size"]) for f in builds[-1]["files"]) if builds else 0
        if size:
            return mirrorcheck.Expected(size, "the size of its last build")
    src = ctx.site.data.get("sources", {}).get(ctx.image.name) or ctx.image.data["source"]
    location = src.get("disk") or src.get("iso")
    if not location:
        return None
    if "://" not in location:
        with contextlib.suppress(OSError):
            return mirrorcheck.Expected(
                Path(_resolve_location(ctx.root, location)).stat().st_size,
                "the size of the source")
        return None
    if location.startswith(("http://", "https://")):
        import requests

        with contextlib.suppress(requests.RequestException, KeyError, ValueError):
            answer = requests.head(location, allow_redirects=True, timeout=10)
            if answer.ok:
                return mirrorcheck.Expected(int(answer.headers["Content-Length"]),
                                            "the size of the source")
    return None


def step_check_release(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """A version a release records never changes: refused before anything is built."""
    pending.check_not_released(ctx.root, ctx.image.name, ctx.version)


def step_check_published(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """A version already on the mirror is built again only with --replace (a new build has
    other bytes, and a published file does not change without it)."""
    mirror = ctx.mirror()
    found = mirror.existing(ctx.mirror_dest)
    if found and not ctx.replace:
        raise PublishRefused(f"{mirror.describe()}: {ctx.mirror_dest} is already published "
                             f"({', '.join(found)}): a published version is not built again",
                             hint="commit a change (a new version), or pass --replace to build "
                                  "it again and replace its files")
    if pending.exists(ctx.work_dir):
        ctx.reporter.warn(f"{ctx.work_dir} keeps a build of this version that was not published: "
                          f"`{pending.command(ctx.image.name, ctx.version)}` would publish it "
                          "without building again; this build replaces it")


def step_publish(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    mirror = ctx.mirror()
    pending.check_not_released(ctx.root, ctx.image.name, ctx.version)  # recorded meanwhile?
    pending.save(ctx.work_dir, ctx.mirror_dest, ctx.artifacts, manifest_entry(ctx))
    try:
        ctx.mirror_paths = mirror.publish(ctx.artifacts, ctx.mirror_dest, ctx.replace)
    except FactoryError as e:
        raise pending.kept(e, ctx.work_dir, ctx.image.name, ctx.version) from None
    ctx.reporter.info(f"    {mirror.describe()}: {ctx.mirror_dest}/{pending.sent(mirror)}")


def manifest_entry(ctx: BuildContext) -> dict[str, Any]:
    return {
        "name": ctx.image.name,
        "builder_type": ctx.builder_type,
        "build_time": ctx.build_time,
        "files": [{"name": a.name, "size": a.size, **({"kind": a.kind} if a.kind else {})}
                  for a in ctx.artifacts],
        "artifact_id": ctx.artifact_id or ctx.image.name,
        "packer_run_uuid": ctx.run_uuid,
        "custom_data": {
            "version": ctx.version,
            "release": ctx.release,
            "git_commit": ctx.git.commit,
            "dirty": ctx.git.dirty,
            "sha256": {a.name: a.sha256 for a in ctx.artifacts},
            # --no-publish: nothing is on the mirror, and tidy/release must not think so
            "published": bool(ctx.mirror_paths),
            "mirror_path": ctx.mirror_dest if ctx.mirror_paths else None,
            "inputs_sha256": ctx.inputs_sha256,
            # each named input's hash: a later build or ./build.py plan says which changed
            inputs.STATE_KEY: ctx.state.get(inputs.STATE_KEY),
            "accelerator": ctx.accelerator,
            **{f.name: f.record(ctx) for f in FEATURES if f.recorded},
            "osimage_version": __version__,
        },
    }


def step_manifest(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    manifest.append_build(ctx.image_manifest, manifest_entry(ctx))
    pending.clear(ctx.work_dir)
    ctx.reporter.info(f"    recorded run {ctx.run_uuid} in "
                   f"{ctx.image_manifest.relative_to(ctx.root)}")


def served_http_directory(ctx: BuildContext) -> str | None:
    """The folder Packer's HTTP server serves: the one rendered for this build, else the
    image's own http_directory."""
    if ctx.http_dir is not None:
        return str(ctx.http_dir)
    folder = ctx.image.data.get("http_directory")
    return None if folder is None else str(ctx.image.directory / folder)


def fresh_output(ctx: BuildContext, hcl: Path, text: str) -> None:
    """The rendered template in the work folder, and no output of an earlier build of the
    version: Packer refuses to validate or build into an output folder that exists."""
    hcl.write_text(text)
    ctx.hcl_file = hcl
    shutil.rmtree(ctx.output_dir, ignore_errors=True)
    pending.clear(ctx.work_dir)  # a kept build of this version whose publish failed: replaced
    ctx.packer_manifest.unlink(missing_ok=True)


def _render_placeholder(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    raise AssertionError("the backend's step fills the render slot")


# The core steps; "render" and "artifacts" are the backend's (its Step fills the slot).
CORE: list[Step] = [
    Step("check up to date", uptodate.step_up_to_date, slot="up to date", publishes=True,
         check=True),  # an unchanged image is not built again (README: incremental builds)
    Step("check mirror", step_check_mirror, slot="check mirror", publishes=True, check=True),
    Step("check release", step_check_release, slot="check release", records=True,
         check=True),  # a released version is never built again
    Step("check published", step_check_published, slot="check published", publishes=True,
         check=True),
    Step("prepare source", step_source, slot="source"),
    Step("make build key", step_key, slot="key"),
    Step("render and validate HCL", _render_placeholder, slot="render"),
    Step("packer build", step_packer, slot="packer"),
    Step("hash artifacts", step_checksums, slot="artifacts"),
    Step("publish to mirror", step_publish, slot="publish", publishes=True),
    Step("record in manifest.json", step_manifest, slot="record", records=True),
]
