"""Exports for diskless provisioning (Warewulf 4, OpenCHAMI), made by the same build as the disk.

An image lists them in image.yaml next to `disk:`:

    outputs:
      disk: {format: qcow2}
      rootfs:                          # a tar of the provisioned root tree, made in the VM LAST
        script: scripts/rootfs.sh      #   (after every provisioner; gets OSIMAGE_ROOTFS_OUTPUT)
        path: /var/tmp/osimage-rootfs.tar   # where the script leaves it; Packer downloads it
      boot: {}                         # boot/vmlinuz-VER and boot/initramfs-VER.img out of it
      squashfs: {compression: zstd}    # NAME.squashfs, tar2sqfs, no root, reproducible
      oci: {}                          # NAME-oci.tar (umoci), pushed to the site's registry

Everything is made on the host from the one downloaded tar, without root: the kernel and
initramfs are read out of it (the newest kernel by version order), tar2sqfs packs it
(SOURCE_DATE_EPOCH = the commit's time, so the same tar gives the same bytes), `umoci raw
add-layer` makes it the OCI image's one layer, written as an archive Warewulf imports
(features/oci.py). The rootfs script gets SOURCE_DATE_EPOCH too and must clamp the tar's file
times to it, and leave the build's SSH key out: the tar is refused otherwise, so two builds of
one commit give the same bytes and no export carries the key. Each file is hashed and joins
ctx.artifacts, so it is published beside the disk and recorded in manifest.json with its
`kind`. The push reads credentials from the site's auth_file,
REGISTRY_AUTH_FILE, or OSIMAGE_REGISTRY_USERNAME/_PASSWORD (written to a 0600 file in a private
temp dir for skopeo's --authfile): never from argv.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import shutil
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from osimage import runner
from osimage.build.context import BuildContext
from osimage.build.feature import Feature, Step
from osimage.errors import BuildError, ConfigError
from osimage.features import oci, ocilayer, ociregistry, parent
from osimage.publish import artifacts
from osimage.sizes import human

NAME = "exports"
DEFAULT_ROOTFS_PATH = "/var/tmp/osimage-rootfs.tar"
DEFAULT_KERNEL = "boot/vmlinuz-*"
DEFAULT_INITRAMFS = "boot/initramfs-{version}.img"


@dataclass
class Exports:
    """What the export steps made: each file's kind, and where the OCI image was pushed."""

    rootfs: Path | None = None
    kernel_version: str | None = None
    oci_layout: Path | None = None
    oci_reference: str | None = None
    oci_digest: str | None = None

    def record(self, files: Sequence[artifacts.Artifact]) -> dict[str, Any]:
        out: dict[str, Any] = {"files": {a.name: a.kind for a in files if a.kind}}
        if self.kernel_version is not None:
            out["kernel_version"] = self.kernel_version
        if self.oci_reference is not None:
            out["oci"] = {"reference": self.oci_reference, "digest": self.oci_digest}
        return out


def spec(ctx: BuildContext) -> dict[str, Any]:
    """The image's export outputs (everything under outputs: but the disk)."""
    outputs: dict[str, Any] = ctx.image.data["outputs"]
    return {k: v or {} for k, v in outputs.items() if k != "disk"}


def wanted(ctx: BuildContext) -> bool:
    return "rootfs" in spec(ctx) and not ctx.create_patches


def _state(ctx: BuildContext) -> Exports:
    state: Exports = ctx.state.setdefault(NAME, Exports())
    return state


def out_dir(ctx: BuildContext) -> Path:
    return ctx.work_dir / "exports"


def rootfs_path(ctx: BuildContext) -> Path:
    """Where Packer downloads the root tree's tar to."""
    return out_dir(ctx) / f"{ctx.image.name}-rootfs.tar"


# --- in the VM: the rootfs provisioner, after all the image's own ----------------------------


def check_config(ctx: BuildContext) -> None:
    rootfs = spec(ctx).get("rootfs")
    if rootfs is not None and not (ctx.image.directory / rootfs["script"]).is_file():
        raise ConfigError(f"images/{ctx.image.name}/image.yaml: outputs.rootfs.script: "
                          f"{rootfs['script']!r} does not exist in images/{ctx.image.name}/")


# --- on the host: the steps after "hash artifacts" ---------------------------------------------


def _add(ctx: BuildContext, path: Path, kind: str) -> artifacts.Artifact:
    made = replace(artifacts.record(path), kind=kind)
    ctx.artifacts.append(made)
    ctx.reporter.info(f"    {made.name}: {human(made.size)}, sha256 {made.sha256}")
    return made


def _build_key(ctx: BuildContext) -> bytes | None:
    """The base64 body of the build's public key, as it would appear in authorized_keys."""
    if ctx.key_file is None:
        return None
    try:
        fields = Path(str(ctx.key_file) + ".pub").read_bytes().split()
    except OSError:
        return None
    return fields[1] if len(fields) > 1 else None


def step_rootfs(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """The tar Packer downloaded: a readable archive of relative paths, its file times clamped
    to SOURCE_DATE_EPOCH, no authorized_keys holding the build's key; hashed."""
    check_config(ctx)
    tar = rootfs_path(ctx)
    script = f"images/{ctx.image.name}/{spec(ctx)['rootfs']['script']}"
    if not tar.is_file() or tar.stat().st_size == 0:
        in_vm = spec(ctx)["rootfs"].get("path", DEFAULT_ROOTFS_PATH)
        raise BuildError(f"the rootfs step left no tar at {in_vm} in the VM",
                         hint=f"see {ctx.log_file}")
    epoch = int(source_date_epoch(ctx))
    key = _build_key(ctx)
    members = 0
    newer: list[str] = []
    try:
        with tarfile.open(tar) as t:
            for m in t:
                members += 1
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts:
                    raise BuildError(f"{tar.name}: unsafe member {m.name!r}; refused")
                if m.mtime > epoch:
                    newer.append(m.name)
                if key is not None and m.isfile() and parts[-2:-1] == (".ssh",):
                    f = t.extractfile(m)
                    if f is not None and key in f.read():
                        raise BuildError(f"{tar.name}: {m.name} holds the build's SSH key; "
                                         "refused", hint=f"{script} must remove it first")
    except tarfile.TarError as e:
        raise BuildError(f"{tar.name}: not a readable tar: {e}") from None
    if newer:
        raise BuildError(f"{tar.name}: {len(newer)} members are newer than SOURCE_DATE_EPOCH "
                         f"({epoch}), e.g. {newer[0]}: the exports would differ from build to "
                         "build", hint=f"{script} must clamp file times to $SOURCE_DATE_EPOCH")
    _state(ctx).rootfs = tar
    ctx.reporter.info(f"    {tar.name}: {members} members")
    _add(ctx, tar, "rootfs")


def _norm(name: str) -> str:
    return name.removeprefix("./").lstrip("/")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order of kernel versions as `sort -V` and rpm see them: runs of digits compare as
    numbers (6.1.0-10 after 6.1.0-9, 4.18.0-348.el8 after 4.18.0-80.el8)."""
    return tuple((0, int(run)) if run.isdigit() else (1, run)
                 for run in re.findall(r"\d+|[^\d]+", version))


def step_boot(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """vmlinuz-VERSION and initramfs-VERSION.img, read out of the root tree's tar: the newest
    kernel by version order and its own initramfs."""
    boot = spec(ctx)["boot"]
    kernel_glob = boot.get("kernel", DEFAULT_KERNEL)
    tar = rootfs_path(ctx)
    with tarfile.open(tar) as t:
        regular = {_norm(m.name): m for m in t.getmembers() if m.isfile()}
        kernels = sorted((n for n in regular if fnmatch.fnmatch(n, kernel_glob)
                          and "rescue" not in n), key=lambda n: version_key(Path(n).name))
        if not kernels:
            raise BuildError(f"{tar.name}: no kernel matching {kernel_glob!r} in the root tree",
                             hint="install a kernel in the image, or set outputs.boot.kernel")
        kernel = kernels[-1]
        version = Path(kernel).name.removeprefix("vmlinuz-")
        initramfs = boot.get("initramfs", DEFAULT_INITRAMFS).format(version=version)
        if _norm(initramfs) not in regular:
            raise BuildError(f"{tar.name}: no initramfs {initramfs!r} for kernel {version}")
        made = []
        for member, name in ((kernel, f"vmlinuz-{version}"),
                             (_norm(initramfs), f"initramfs-{version}.img")):
            src = t.extractfile(regular[member])
            assert src is not None
            with src, (out_dir(ctx) / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, artifacts.CHUNK)
            made.append(out_dir(ctx) / name)
    _state(ctx).kernel_version = version
    _add(ctx, made[0], "kernel")
    _add(ctx, made[1], "initramfs")


def source_date_epoch(ctx: BuildContext) -> str:
    """The commit's time: the squashfs and the OCI image are dated by it, not by the clock."""
    return runner.output(["git", "-C", str(ctx.root), "show", "-s", "--format=%ct",
                          ctx.git.commit], what="git show").strip()


def step_squashfs(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """NAME.squashfs from the tar with tar2sqfs: no root, no extraction; the same tar and
    commit give the same bytes."""
    comp = spec(ctx)["squashfs"].get("compression", "zstd")
    out = out_dir(ctx) / f"{ctx.image.name}.squashfs"
    make_squashfs(rootfs_path(ctx), out, comp, source_date_epoch(ctx),
                  ctx.work_dir / "exports.log")
    _add(ctx, out, "squashfs")


def make_squashfs(tar: Path, out: Path, compression: str, epoch: str, log_path: Path) -> None:
    out.unlink(missing_ok=True)
    with log_path.open("a") as log:
        # --defaults: directories the tar only implies get the commit's time, not 0 or now
        runner.run(["tar2sqfs", "--quiet", "--force", "--no-skip", "--compressor", compression,
                    "--defaults", f"mtime={epoch}", str(out)], stdin_file=tar, log=log,
                   env={"SOURCE_DATE_EPOCH": epoch}, what="tar2sqfs")


def _tag(ctx: BuildContext) -> str:
    return ctx.version.replace("+", "_")  # an OCI tag allows [A-Za-z0-9_.-]


def step_oci(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """An OCI image whose one layer is the root tree's tar: a layout (for the push) and
    NAME-oci.tar, an OCI archive that is also a docker-archive (osimage/features/oci.py)."""
    layout = out_dir(ctx) / "oci"
    shutil.rmtree(layout, ignore_errors=True)
    image = f"{layout}:{_tag(ctx)}"
    epoch = int(source_date_epoch(ctx))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    labels = {"org.opencontainers.image.title": ctx.image.name,
              "org.opencontainers.image.version": ctx.version,
              "org.opencontainers.image.revision": ctx.git.commit,
              "org.opencontainers.image.created": created,
              "osimage.image": ctx.image.name, "osimage.version": ctx.version,
              "osimage.git_commit": ctx.git.commit}
    with (ctx.work_dir / "exports.log").open("a") as log:
        def umoci(*args: str) -> None:
            runner.run(["umoci", *args], log=log, what=f"umoci {args[0]}")

        lower = _parent_oci(ctx)
        if lower is not None:  # a layer on the parent's image (features/ocilayer.py)
            d = ocilayer.layered(*lower, rootfs_path(ctx), layout, _tag(ctx), epoch, umoci,
                                 created, f"osimage {ctx.image.name} layer")
            ctx.reporter.info(f"    the parent's OCI image plus one layer: {d.describe()}")
        else:
            umoci("init", "--layout", str(layout))
            umoci("new", "--image", image)
            umoci("raw", "add-layer", "--image", image, "--history.created", created,
                  "--history.created_by", f"osimage {ctx.image.name} rootfs",
                  str(rootfs_path(ctx)))
        umoci("config", "--image", image, "--created", created, "--history.created", created,
              "--config.cmd", "/sbin/init",
              *[f"--config.label={k}={v}" for k, v in sorted(labels.items())])
    archive = out_dir(ctx) / f"{ctx.image.name}-oci.tar"
    oci.write_archive(layout, _tag(ctx), f"{_repository(ctx)}:{_tag(ctx)}", archive, epoch)
    _state(ctx).oci_layout = layout
    _add(ctx, archive, "oci")


def _parent_oci(ctx: BuildContext) -> tuple[Path, Path] | None:
    """The parent's OCI archive and rootfs tar, fetched and checked, when the image is a
    layer on a parent that exports both."""
    p = parent.of(ctx)
    if p is None:
        return None
    archive, rootfs = p.export("oci"), p.export("rootfs")
    if archive is None or rootfs is None:
        ctx.reporter.info(f"    {p.image} {p.version} exports no OCI image and rootfs: the OCI "
                          "image is one layer of the whole tree")
        return None
    return (parent.fetch(ctx, *archive).path, parent.fetch(ctx, *rootfs).path)


def _repository(ctx: BuildContext) -> str:
    repo: str = spec(ctx)["oci"].get("repository", ctx.image.name)
    return repo


def reference(ctx: BuildContext) -> str:
    reg = ociregistry.registry(ctx)
    assert reg is not None
    return f"{reg['url'].rstrip('/')}/{_repository(ctx)}:{_tag(ctx)}"


def step_push(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """skopeo copy of the OCI layout to the site's registry; records the manifest digest."""
    if ociregistry.registry(ctx) is None:
        ctx.reporter.info("    no registry in the site file: the OCI image is not pushed "
                          "(its archive is published with the build)")
        return
    state = _state(ctx)
    assert state.oci_layout is not None
    ref = reference(ctx)
    tls = "true" if (ociregistry.registry(ctx) or {}).get("tls_verify", True) else "false"
    digest_file = out_dir(ctx) / "oci-digest"
    with ociregistry.auth_file(ctx) as auth, (ctx.work_dir / "exports.log").open("a") as log:
        argv = ["skopeo", "copy", "--quiet", f"--dest-tls-verify={tls}",
                "--digestfile", str(digest_file)]
        if auth is not None:
            argv += ["--authfile", str(auth)]
        runner.run([*argv, f"oci:{state.oci_layout}:{_tag(ctx)}", f"docker://{ref}"],
                   log=log, what="skopeo copy (push)")
    state.oci_reference = ref
    state.oci_digest = digest_file.read_text().strip()
    ctx.reporter.info(f"    pushed docker://{ref} ({state.oci_digest})")


class DisklessExports(Feature):
    name = NAME
    recorded = True

    def steps(self, ctx: BuildContext) -> list[Step]:
        """After the disk is hashed: the exports the image lists (none without
        outputs.rootfs); the push, and its check before the VM, only to a site's registry."""
        if not wanted(ctx):
            return []
        outputs = spec(ctx)
        steps = [Step("export rootfs", step_rootfs, at="after artifacts")]
        if "boot" in outputs:
            steps.append(Step("extract kernel and initramfs", step_boot, at="after artifacts"))
        if "squashfs" in outputs:
            steps.append(Step("build squashfs", step_squashfs, at="after artifacts"))
        if "oci" in outputs:
            steps.append(Step("build OCI image", step_oci, at="after artifacts"))
            # effects outside the work folder: a build that does not publish leaves it out,
            # or it would move a published tag
            steps.append(Step("push OCI image", step_push, at="after artifacts",
                              publishes=True))
            if ociregistry.registry(ctx) is not None:
                steps.append(Step("check registry", ociregistry.step_check_registry,
                                  at="after check mirror", publishes=True, check=True))
        return steps

    def provisioners(self, ctx: BuildContext, provs: list[dict[str, Any]],
                     env: dict[str, str]) -> list[dict[str, Any]]:
        if not wanted(ctx):
            return provs
        rootfs = spec(ctx)["rootfs"]
        in_vm = rootfs.get("path", DEFAULT_ROOTFS_PATH)
        local = rootfs_path(ctx)
        shutil.rmtree(out_dir(ctx), ignore_errors=True)
        # Packer writes a download into an existing file without truncating it: start empty.
        local.parent.mkdir(parents=True)
        env = {"OSIMAGE_IMAGE": ctx.image.name, "OSIMAGE_VERSION": ctx.version,
               "OSIMAGE_COMMIT": ctx.git.commit, "OSIMAGE_ROOTFS_OUTPUT": in_vm,
               "SOURCE_DATE_EPOCH": source_date_epoch(ctx)}
        return [*provs,
                {"name": "export-rootfs", "type": "shell",
                 "script": str(ctx.image.directory / rootfs["script"]),
                 "env_list": [f"{k}={v}" for k, v in sorted(env.items())]},
                {"name": "download-rootfs", "type": "file", "direction": "download",
                 "source": in_vm, "destination": str(local)}]

    def record(self, ctx: BuildContext) -> dict[str, Any] | None:
        """The manifest entry's `exports`: kinds of the files, the pushed OCI reference."""
        state: Exports | None = ctx.state.get(NAME)
        return state.record(ctx.artifacts) if state is not None else None


FEATURE = DisklessExports()
