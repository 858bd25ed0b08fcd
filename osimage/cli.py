"""Command line: ./build.py IMAGE [--release X] [--skip-commit], plus subcommands.

Exit status: 0 success, 1 build failed, 2 bad usage or configuration, 130 interrupted.
Heavy modules are imported inside the commands so that --help stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from osimage.errors import EXIT_INTERRUPTED, EXIT_USAGE, FactoryError

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
        formatter.write_usage("./build.py", "IMAGE [--release X] [--skip-commit] [OPTIONS] "
                              "| COMMAND [ARGS]...")


def project_root() -> Path:
    from osimage.gitstate import find_root

    start = Path(os.environ.get("OSIMAGE_ROOT") or Path.cwd())
    return find_root(start)


def _reporter() -> Any:
    from osimage.ui import Reporter

    return Reporter()


site_option = click.option("--site", "site_file", type=click.Path(path_type=Path, dir_okay=False),
                           help="Site file (default: site.yaml at the root, else the embedded "
                                "defaults: local qemu backend, local mirror/).")
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
def build_cmd(image: str, release: str | None, skip_commit: bool, site_file: Path | None,
              keep_failed: bool, no_publish: bool) -> None:
    """Build IMAGE (the default command: ./build.py IMAGE)."""
    from osimage.pipeline import BuildOptions, run_build

    opts = BuildOptions(image=image, release=release, skip_commit=skip_commit,
                        site_file=site_file, keep_failed=keep_failed, publish=not no_publish)
    run_build(project_root(), opts, _reporter())


@cli.command("render")
@click.argument("image")
@release_option
@site_option
def render_cmd(image: str, release: str | None, site_file: Path | None) -> None:
    """Render IMAGE's Packer HCL into build/IMAGE/VERSION/ and validate it, without building."""
    from osimage.pipeline import BuildOptions, render_only

    root = project_root()
    path = render_only(root, BuildOptions(image=image, release=release, site_file=site_file),
                       _reporter())
    click.echo(path.relative_to(root))


@cli.command("list")
def list_cmd() -> None:
    """List the images (folders under images/ with an image.yaml)."""
    from osimage.config import list_images, read_yaml

    root = project_root()
    for name in list_images(root):
        data = read_yaml(root / "images" / name / "image.yaml", f"images/{name}/image.yaml")
        desc = data.get("description", "") if isinstance(data, dict) else ""
        click.echo(f"{name:20} {desc}".rstrip())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status instead of exiting."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name="build.py", standalone_mode=False)
    except FactoryError as e:
        from osimage.ui import Reporter

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
