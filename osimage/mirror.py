"""The mirror: where artifacts are published, laid out as builds/IMAGE/VERSION/FILE.

The embedded default is a local folder (mirror/ at the root) with the production layout.
Files are copied under a temporary name and renamed into place only when all of them are
complete, so no partial file is ever visible under its final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from osimage.artifacts import Artifact
from osimage.errors import BuildError, ConfigError
from osimage.fsutil import fsync_dir
from osimage.runner import check_interrupted

LAYOUT = ("builds", "repos/Rocky8")


class Mirror(Protocol):
    def describe(self) -> str: ...

    def publish(self, artifacts: Sequence[Artifact], dest: str) -> list[str]:
        """Publish files under dest (e.g. builds/smoke/1.0); return their mirror paths."""
        ...


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:12]}")


@dataclass
class LocalMirror:
    root: Path

    def describe(self) -> str:
        return f"local mirror {self.root}"

    def ensure_layout(self) -> None:
        for sub in LAYOUT:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def publish(self, artifacts: Sequence[Artifact], dest: str) -> list[str]:
        self.ensure_layout()
        target = self.root / dest
        target.mkdir(parents=True, exist_ok=True)
        sources: list[Path] = []
        for a in artifacts:
            sources += [a.path, a.checksum_path]
        staged: list[tuple[Path, Path]] = []
        try:
            for src in sources:
                check_interrupted()
                final = target / src.name
                tmp = temp_name(final)
                staged.append((tmp, final))
                shutil.copyfile(src, tmp)  # sendfile: the bytes never pass through Python
                with tmp.open("rb+") as f:
                    os.fsync(f.fileno())
                if tmp.stat().st_size != src.stat().st_size:
                    raise BuildError(f"{final}: copy is incomplete")
            check_interrupted()
            for tmp, final in staged:
                os.replace(tmp, final)
            fsync_dir(target)
        except OSError as e:
            raise BuildError(f"{self.describe()}: publishing to {dest} failed: {e.strerror or e}",
                             hint="check the free space and permissions of the mirror") from None
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return [f"{dest}/{src.name}" for src in sources]


def open_mirror(url: str, root: Path, settings: Mapping[str, Any] | None = None) -> Mirror:
    """The mirror a site names: a local folder, or ssh://USER@HOST[:PORT]/ROOT.

    settings is the site's whole mirror object (http, identity_file, known_hosts).
    """
    if url.startswith("ssh://"):
        from osimage.sshmirror import SSHMirror  # paramiko loads only for an SSH mirror

        return SSHMirror.from_settings(url, settings or {}, root)
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"mirror.url: {url!r}: expected a local folder or "
                          "ssh://USER@HOST[:PORT]/ROOT")
    path = Path(url.removeprefix("file://"))
    if not path.is_absolute():
        path = root / path
    return LocalMirror(path)
