"""The folder Packer serves over HTTP during a build, with its templates rendered for the build.

An installer takes its answer file (a kickstart, an Alpine setup script) from Packer's HTTP
server, and that file needs things only the build knows, first of all the public half of the
build's temporary SSH key. So the image's `http_directory` may hold Jinja2 templates: every
`NAME.j2` is rendered to `NAME` into `build/IMAGE/VERSION/http/` (other files are copied as they
are) and Packer serves that folder instead. A folder without templates is served as it is.

Templates see:
    ssh_public_key   the build's public key, one line ("ssh-ed25519 AAAA... osimage-build-...")
    ssh_username     the user Packer logs in as (image.yaml ssh.username)
    image, version, commit, release (None without --release)

Only the public key ever reaches these files: a rendered file that holds a private key is
refused, and the key pair itself is deleted when the build ends.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from osimage.build.context import BuildContext
from osimage.build.feature import Feature, Step
from osimage.config import Image, display_path
from osimage.errors import BuildError, ConfigError

SUFFIX = ".j2"


def _templates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{SUFFIX}") if p.is_file())


def variables(ctx: BuildContext) -> dict[str, Any]:
    assert ctx.key_file is not None
    public = Path(str(ctx.key_file) + ".pub").read_text().strip()
    return {
        "ssh_public_key": public,
        "ssh_username": ctx.image.data.get("ssh", {}).get("username", "root"),
        "image": ctx.image.name,
        "version": ctx.version,
        "commit": ctx.git.commit,
        "release": ctx.release,
    }


def render_folder(source: Path, dest: Path, values: dict[str, Any], shown: str) -> list[Path]:
    """Copy source to dest, rendering each NAME.j2 to NAME; return the rendered files."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(source)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - answer files and scripts, not HTML
    )
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    rendered: list[Path] = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir():
            (dest / rel).mkdir(exist_ok=True)
            continue
        if path.name.endswith(SUFFIX):
            out = dest / rel.parent / path.name.removesuffix(SUFFIX)
            try:
                text = env.get_template(rel.as_posix()).render(**values)
            except jinja2.UndefinedError as e:
                raise ConfigError(f"{shown}/{rel}: {e.message} (known: "
                                  f"{', '.join(sorted(values))})") from None
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{shown}/{rel}:{e.lineno}: {e.message}") from None
            if "PRIVATE KEY" in text:
                raise BuildError(f"{shown}/{rel}: the rendered file holds a private key; "
                                 "only the build's public key may be served")
            out.write_text(text)
            shutil.copymode(path, out)
            rendered.append(out)
        else:
            shutil.copy2(path, dest / rel)
    return rendered


def has_templates(image: Image) -> bool:
    folder = image.data.get("http_directory")
    return folder is not None and bool(_templates(image.directory / folder))


def step_http(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """Render the image's http_directory for this build (only when it holds templates)."""
    folder = ctx.image.data.get("http_directory")
    if folder is None:
        return
    source = ctx.image.directory / folder
    if not _templates(source):
        return
    dest = ctx.work_dir / "http"
    shown = f"images/{ctx.image.name}/{folder}"
    rendered = render_folder(source, dest, variables(ctx), shown)
    ctx.http_dir = dest
    names = ", ".join(str(p.relative_to(dest)) for p in rendered)
    ctx.reporter.info(f"    rendered {names} into {display_path(dest, ctx.root)}/")


class HttpDirectory(Feature):
    name = "http_directory"

    def steps(self, ctx: BuildContext) -> list[Step]:
        if not has_templates(ctx.image):
            return []
        return [Step("render http files", step_http, at="after key")]


FEATURE = HttpDirectory()
