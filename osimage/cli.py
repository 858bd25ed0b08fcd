"""Command line: ./build.py IMAGE [--release X] [--skip-commit], plus subcommands.

Exit status: 0 success, 1 build failed, 2 bad usage or configuration, 130 interrupted.
Heavy modules are imported inside the commands so that --help stays fast.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import click

from osimage.errors import EXIT_INTERRUPTED, EXIT_USAGE, FactoryError, Interrupted

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class ImageGroup(click.Group):
    """A group whose first argument may be an image: `build.py smoke` is `build.py build smoke`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["build", *args]
        elif args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            # options before the image name: ./build.py --skip-commit smoke
            args = ["build", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage("./build.py", "IMAGE [OPTIONS] | COMMAND [ARGS]...")


def project_root() -> Path:
    from osimage.build.gitstate import find_root

    start = Path(os.environ.get("OSIMAGE_ROOT") or Path.cwd())
    return find_root(start)


def _reporter() -> Any:
    from osimage.ui import Reporter

    return Reporter()


site_option = click.option("--site", "site_file", type=click.Path(path_type=Path, dir_okay=False),
                           help="Site file (default: site.yaml at the root, else the embedded "
                                "defaults: local qemu backend, local mirror/).")
replace_option = click.option(
    "--replace", is_flag=True,
    help="Give files of this version already on the mirror other bytes (refused without it; "
         "never allowed for a version a release records).")
host_key_option = click.option(
    "--accept-new-host-key", is_flag=True,
    help="Trust an SSH mirror whose host key is not in known_hosts yet, and add it "
         "(a changed host key is always refused).")
release_option = click.option("--release", metavar="X",
                              help="Release to build (the version becomes X, or X-dirty).")


@click.group(cls=ImageGroup, context_settings=CONTEXT, invoke_without_command=False)
@click.version_option(package_name="osimage", message="osimage %(version)s")
def cli() -> None:
    """Build the cluster's OS images with Packer, publish them to the mirror, and keep the
    release manifest.

    \b
    Examples:
      ./build.py smoke                       build images/smoke into the mirror
      ./build.py rocky8-base --release 2.4.0
      ./build.py smoke --skip-commit         build from a dirty tree (version ...-dirty)
      ./build.py render rocky8-base          render + validate the Packer HCL only
      ./build.py plan                        what `all` would build, and why
      ./build.py all --release 2.4.0         every image, parents first
    """


@cli.command("build")
@click.argument("image")
@release_option
@click.option("--skip-commit", is_flag=True,
              help="Allow a dirty git tree; the version is marked -dirty.")
@site_option
@click.option("--keep-failed", is_flag=True,
              help="Keep the output of a failed build in build/IMAGE/VERSION/ for inspection.")
@click.option("--no-publish", is_flag=True, help="Build and record, but do not publish.")
@replace_option
@click.option("--rebuild", is_flag=True,
              help="Build even when the image is up to date (its last clean published build "
                   "has the same inputs hash and its files are on the mirror); a version "
                   "already published then also needs --replace.")
@host_key_option
@click.option("--create-patches", is_flag=True,
              help="Make the next security-patch tarball in the VM instead of an image and "
                   "publish it under repos/Rocky8/ (images whose image.yaml has "
                   "patches.create; --release is ignored).")
@click.option("--debug", is_flag=True,
              help="Step through the build on this terminal (packer -debug, -on-error=ask) and "
                   "print how to log in to the VM. Never published nor recorded; the version "
                   "ends in -debug.")
@click.option("--break-before", "break_before", multiple=True, metavar="STEP",
              help="Pause before provisioner STEP (a name from image.yaml). Repeatable.")
@click.option("--break-after", "break_after", multiple=True, metavar="STEP",
              help="Pause after provisioner STEP. Repeatable.")
def build_cmd(image: str, release: str | None, skip_commit: bool, site_file: Path | None,
              keep_failed: bool, no_publish: bool, debug: bool, break_before: tuple[str, ...],
              break_after: tuple[str, ...], create_patches: bool,
              accept_new_host_key: bool, replace: bool, rebuild: bool) -> None:
    """Build IMAGE (the default command: ./build.py IMAGE)."""
    from osimage.build.context import BuildOptions
    from osimage.build.pipeline import run_build

    opts = BuildOptions(image=image, release=release, skip_commit=skip_commit,
                        site_file=site_file, keep_failed=keep_failed, publish=not no_publish,
                        debug=debug, break_before=break_before, break_after=break_after,
                        create_patches=create_patches, replace=replace,
                        accept_new_host_key=accept_new_host_key, rebuild=rebuild)
    run_build(project_root(), opts, _reporter())


@cli.command("publish")
@click.argument("image")
@click.argument("version")
@replace_option
@host_key_option
@site_option
def publish_cmd(image: str, version: str, replace: bool, accept_new_host_key: bool,
                site_file: Path | None) -> None:
    """Publish the build of IMAGE VERSION kept after its publish failed or was interrupted
    (build/IMAGE/VERSION/), then record it; only what the mirror does not have is sent."""
    from osimage.publish.pending import publish_kept

    paths = publish_kept(project_root(), image, version, site_file, replace, _reporter(),
                         accept_new_host_key)
    click.echo(f"published {image} {version}: {', '.join(paths[::2])}")


@cli.command("render")
@click.argument("image")
@release_option
@site_option
@click.option("--create-patches", is_flag=True,
              help="Render what a --create-patches build runs (the create step, the download).")
def render_cmd(image: str, release: str | None, site_file: Path | None,
               create_patches: bool) -> None:
    """Render IMAGE's Packer HCL into build/IMAGE/VERSION/ and validate it, without building."""
    from osimage.build.pipeline import BuildOptions, render_only

    root = project_root()
    opts = BuildOptions(image=image, release=release, site_file=site_file,
                        create_patches=create_patches)
    path = render_only(root, opts, _reporter())
    click.echo(path.relative_to(root))


images_argument = click.argument("images", nargs=-1, metavar="[IMAGE]...")


@cli.command("plan", short_help="The build order, and for each image what changed.")
@images_argument
@release_option
@site_option
def plan_cmd(images: tuple[str, ...], release: str | None, site_file: Path | None) -> None:
    """Print the order `all` builds IMAGE... in (default: every image; parents first, an image
    that embeds another after it) and, for each, "up to date (build V)" or what changed
    (which input, old and new hash). Builds nothing, starts no VM."""
    from osimage.build import plan

    for line in plan.show(project_root(), images, release, site_file):
        click.echo(line)


@cli.command("all", short_help="Build the images in order, reusing up-to-date ones.")
@images_argument
@release_option
@click.option("--skip-commit", is_flag=True,
              help="Allow a dirty git tree; the versions are marked -dirty.")
@site_option
@click.option("--keep-failed", is_flag=True,
              help="Keep the output of a failed build in build/IMAGE/VERSION/ for inspection.")
@click.option("--rebuild", is_flag=True, help="Build each image even when it is up to date.")
@replace_option
@host_key_option
def all_cmd(images: tuple[str, ...], release: str | None, skip_commit: bool,
            site_file: Path | None, keep_failed: bool, rebuild: bool, replace: bool,
            accept_new_host_key: bool) -> int:
    """Build IMAGE... (default: every image that can build with these options; usb-installer
    needs --release) and their parents, in the order `plan` prints, each as `./build.py IMAGE`
    builds it; up-to-date images are reused. When one fails, the images that need it are
    skipped and the others go on; a table at the end. Exit 1 if any failed."""
    from osimage.build.context import BuildOptions
    from osimage.build.many import build_all

    base = BuildOptions(image="", release=release, skip_commit=skip_commit,
                        site_file=site_file, keep_failed=keep_failed, replace=replace,
                        accept_new_host_key=accept_new_host_key, rebuild=rebuild)
    return build_all(project_root(), images, base, _reporter(), click.echo)


@cli.command("list")
def list_cmd() -> None:
    """List the images (folders under images/ with an image.yaml)."""
    from osimage.config import list_images, read_yaml

    root = project_root()
    for name in list_images(root):
        data = read_yaml(root / "images" / name / "image.yaml", f"images/{name}/image.yaml")
        desc = data.get("description", "") if isinstance(data, dict) else ""
        click.echo(f"{name:20} {desc}".rstrip())


mirror_url_option = click.option(
    "--mirror-url", metavar="URL",
    help="Mirror to check files against: an http(s):// base, or a local folder (default: the "
         "site's mirror.http, else its local mirror folder).")


@cli.group("release")
def release_group() -> None:
    """Record, check and compare releases in manifests/manifest.yaml.

    \b
    Examples:
      ./build.py release record 2.4.0          latest clean build of every image
      ./build.py release set 2.4.0 smoke --version gabc1234567
      ./build.py release set-patches 2.4.0 repos/Rocky8/rocky8-patches-20261126.tar.gz
      ./build.py release verify 2.4.0          every file on the mirror, size and sha256
      ./build.py release diff 2.3.0 2.4.0
    """


@release_group.command("record")
@click.argument("name", metavar="RELEASE")
@click.argument("images", nargs=-1, metavar="[IMAGE]...")
@click.option("--force", is_flag=True, help="Record the release again if it exists.")
@mirror_url_option
@site_option
def release_record_cmd(name: str, images: tuple[str, ...], force: bool, mirror_url: str | None,
                       site_file: Path | None) -> None:
    """Record RELEASE from the latest clean published build of each IMAGE, read from
    images/IMAGE/manifest.json, once each file matches the mirror. Without IMAGE: every image
    that has one; the others are named as skipped."""
    from osimage.release import commands as release

    root = project_root()
    reader = release.open_reader(root, site_file, mirror_url)
    rel = release.record(root, name, images, force, reader, _reporter().info)
    click.echo(release.show_release(rel))
    click.echo(f"recorded release {name} in {release.MANIFEST}")


@release_group.command("set")
@click.argument("name", metavar="RELEASE")
@click.argument("image")
@click.option("--version", "version", metavar="V",
              help="The build of IMAGE with this version (default: its latest clean build).")
@click.option("--commit", metavar="SHA",
              help="By hand: the commit the files were built from (needs --version, --file).")
@click.option("--file", "files", multiple=True, metavar="PATH",
              help="By hand: a file of the entry, a name in builds/IMAGE/V/ or a mirror path "
                   "(repeatable).")
@click.option("--sha256", "sha256s", multiple=True, metavar="HEX",
              help="By hand: the sha256 each --file must have on the mirror, in order.")
@click.option("--force", is_flag=True, help="Replace the release's entry for IMAGE if it exists.")
@mirror_url_option
@site_option
def release_set_cmd(name: str, image: str, version: str | None, commit: str | None,
                    files: tuple[str, ...], sha256s: tuple[str, ...], force: bool,
                    mirror_url: str | None, site_file: Path | None) -> None:
    """Set IMAGE's entry of RELEASE: from a build in images/IMAGE/manifest.json, or by hand
    with --commit, --version and --file."""
    from osimage.errors import ConfigError
    from osimage.release import commands as release

    root = project_root()
    reader = release.open_reader(root, site_file, mirror_url)
    if commit is None:
        if files or sha256s:
            raise ConfigError("--file and --sha256 set an entry by hand: give --commit and "
                              "--version too")
        entry = release.entry_from_build(root, image, version)
    else:
        if version is None:
            raise ConfigError("--commit sets an entry by hand: give --version and --file too")
        entry = release.entry_by_hand(root, image, version, commit, files, sha256s, reader)
    rel = release.set_image(root, name, image, entry, force, reader, _reporter().info)
    click.echo(release.show_release(rel))
    click.echo(f"set {image} {entry.version} in release {name} of {release.MANIFEST}")


@release_group.command("set-patches")
@click.argument("name", metavar="RELEASE")
@click.argument("path", metavar="PATH")
@click.option("--sha256", metavar="HEX", help="The sha256 the tarball must have.")
@click.option("--force", is_flag=True, help="Replace the patch tarball RELEASE names.")
@mirror_url_option
@site_option
def release_set_patches_cmd(name: str, path: str, sha256: str | None, force: bool,
                            mirror_url: str | None, site_file: Path | None) -> None:
    """Make the published patch tarball at PATH on the mirror RELEASE's patches, with the size
    and sha256 read from the mirror (they must agree with its .sha256 file and index)."""
    from osimage.release import commands as release
    from osimage.release import patches as patchrelease

    root = project_root()
    reader = release.open_reader(root, site_file, mirror_url)
    rel = patchrelease.set_patches(root, name, path, sha256, force, reader, _reporter().info)
    click.echo(release.show_release(rel))
    click.echo(f"set the patches of release {name} in {release.MANIFEST}")


@release_group.command("verify")
@click.argument("name", metavar="RELEASE")
@mirror_url_option
@site_option
def release_verify_cmd(name: str, mirror_url: str | None, site_file: Path | None) -> None:
    """Check every file of RELEASE on the mirror (size and sha256); exit 1 on any mismatch."""
    from osimage.release import commands as release

    root = project_root()
    rel = release.load(root).get(name)
    reader = release.open_reader(root, site_file, mirror_url)
    rows = release.verify(rel, reader)
    click.echo(release.verify_table(rows))
    click.echo(release.require_verified(rel, rows, reader))


@release_group.command("show")
@click.argument("name", metavar="[RELEASE]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print RELEASE as JSON.")
def release_show_cmd(name: str | None, as_json: bool) -> None:
    """List the releases, or show RELEASE's images and files."""
    from osimage.errors import ConfigError
    from osimage.release import commands as release

    m = release.load(project_root())
    if name is None:
        if as_json:
            raise ConfigError("--json: name the release to print")
        click.echo(release.show_list(m))
    else:
        rel = m.get(name)
        click.echo(release.release_json(rel) if as_json else release.show_release(rel))


@release_group.command("diff")
@click.argument("old", metavar="A")
@click.argument("new", metavar="B")
def release_diff_cmd(old: str, new: str) -> None:
    """What changed from release A to release B, image by image."""
    from osimage.release import commands as release

    m = release.load(project_root())
    for line in release.diff(m.get(old), m.get(new)):
        click.echo(line)


@cli.command("write-usb")
@click.argument("image", metavar="IMAGE|FILE")
@click.argument("device")
@click.option("--release", metavar="X", help="IMAGE's disk file in release X.")
@click.option("--version", "version", metavar="V",
              help="IMAGE's build V (default: its latest clean build).")
@click.option("--yes", is_flag=True, help="Do not ask before writing (needed without a terminal).")
@click.option("--force", is_flag=True,
              help="Write DEVICE even when it is not removable or is in use (mounted, swap).")
@site_option
def write_usb_cmd(image: str, device: str, release: str | None, version: str | None, yes: bool,
                  force: bool, site_file: Path | None) -> None:
    """Write IMAGE (e.g. usb-installer) or FILE to the USB stick DEVICE, then read it back and
    check its sha256. Refuses a partition, a disk that is not removable or is in use (unless
    --force), and asks first (unless --yes)."""
    from osimage.usb import write as usbwrite

    reporter = _reporter()
    # the project root only when IMAGE names a recorded build, not for a FILE
    click.echo(usbwrite.run(project_root, image, device, release, version, yes, force,
                            site_file, reporter.info, reporter.warn))


@cli.command("tidy")
@click.argument("images", nargs=-1, metavar="[IMAGE]...")
@click.option("--check", is_flag=True,
              help="Change nothing; exit 1 unless each manifest.json is tidy (for CI, hooks).")
def tidy_cmd(images: tuple[str, ...], check: bool) -> None:
    """Reduce images/IMAGE/manifest.json (default: every image's) to its latest clean build."""
    from osimage.release import tidy

    root = project_root()
    for line in (tidy.check if check else tidy.tidy)(root, images):
        click.echo(line)


@cli.command("clean")
@click.option("--older-than", "older_than", default="2h", show_default=True, metavar="AGE",
              help="Only what was last written longer ago than AGE (90s, 30m, 2h, 7d); 0 for "
                   "everything, including what has no known age.")
@click.option("--yes", is_flag=True, help="Remove them. Without it, only list them (dry run).")
@click.option("--uri", metavar="URI", help="Hypervisor (default: libvirt.uri of the site file).")
@click.option("--prefix", default="packer-", show_default=True,
              help="Of what osimage builds made (their tag selects), only names starting "
                   "with this (domains packer-osimage-IMAGE-RUN, volumes <domain>-<alias>).")
@site_option
def clean_cmd(older_than: str, yes: bool, uri: str | None, prefix: str,
              site_file: Path | None) -> None:
    """List the domains and volumes failed libvirt builds left on the hypervisor, with their
    age; remove those older than --older-than with --yes (a dry run by default)."""
    from osimage.backends.libvirt import clean as libvirt_clean

    target = libvirt_clean.resolve_uri(project_root(), site_file, uri)
    libvirt_clean.clean(target, libvirt_clean.parse_age(older_than), yes, prefix, click.echo)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status instead of exiting."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _main(args)
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError as e:
        if e.errno not in (errno.EIO, errno.EPIPE):
            raise
        # the terminal is gone (SIGHUP, a closed pipe): nobody reads the output any more, and
        # the exit status must not become Python's 120 for an unflushable stream
        devnull = open(os.devnull, "w")  # noqa: SIM115 (lives until the process ends)
        sys.stdout = sys.stderr = devnull
        from osimage.runner import interruption

        code = EXIT_INTERRUPTED if interruption() is not None else 1
    return code


def _main(args: list[str]) -> int:
    try:
        result = cli.main(args=args, prog_name="build.py", standalone_mode=False)
    except FactoryError as e:
        from osimage.runner import interruption
        from osimage.ui import Reporter

        # a command that a terminal's Ctrl-C reached too (it is in our process group) fails:
        # the stop request is the cause to report
        if not isinstance(e, Interrupted):
            e = interruption() or e
        Reporter().error(e.message, e.hint)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        e.show()
        return EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())
