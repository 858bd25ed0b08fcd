"""The one small object the build's steps share, and the options a build is started with."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osimage.build.gitstate import GitState
from osimage.config import Image, Site
from osimage.publish.artifacts import Artifact
from osimage.ui import Reporter

if TYPE_CHECKING:
    from osimage.publish.mirror import Mirror


@dataclass
class BuildOptions:
    """What the command line asks of a build (./build.py IMAGE ..., ./build.py render IMAGE)."""

    image: str
    release: str | None = None
    skip_commit: bool = False
    site_file: Path | None = None
    keep_failed: bool = False
    publish: bool = True
    create_patches: bool = False
    debug: bool = False
    break_before: tuple[str, ...] = ()
    break_after: tuple[str, ...] = ()
    replace: bool = False  # --replace: files of this version on the mirror may get other bytes
    accept_new_host_key: bool = False  # --accept-new-host-key: trust a new SSH mirror host key
    render_only: bool = False  # ./build.py render: up to the rendered HCL, no Packer
    rebuild: bool = False  # --rebuild: build even when the image is up to date

    @property
    def interactive(self) -> bool:
        return self.debug or bool(self.break_before or self.break_after)


@dataclass
class BuildContext:
    root: Path
    image: Image
    site: Site
    git: GitState
    version: str
    release: str | None
    work_dir: Path
    keep_failed: bool = False
    debug: bool = False
    break_before: list[str] = field(default_factory=list)
    break_after: list[str] = field(default_factory=list)
    hcl_checker: Any = None  # render.HCLChecker, started before the configuration is read
    reporter: Reporter = field(default_factory=lambda: Reporter(quiet=True))
    run_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    accelerator: str = "tcg"
    key_file: Path | None = None
    hcl_file: Path | None = None
    inputs_sha256: str = ""
    source_url: str = ""
    source_checksum: str = ""
    build_time: int = 0
    builder_type: str = ""
    artifact_id: str = ""
    artifacts: list[Artifact] = field(default_factory=list)
    mirror_paths: list[str] = field(default_factory=list)
    create_patches: bool = False  # --create-patches: the build makes a patch tarball
    replace: bool = False  # --replace: this version's files on the mirror may change
    accept_new_host_key: bool = False  # --accept-new-host-key (SSH mirrors)
    rebuild: bool = False  # --rebuild: build even when the image is up to date
    http_dir: Path | None = None  # http_directory as served to this build (rendered or as is)
    # How a person logs in to the guest (argv), when the backend knows better than qemu's
    # forwarded port on 127.0.0.1 (libvirt native: the guest's address, maybe a bastion).
    guest_login: list[str] = field(default_factory=list)
    # Each feature's and the backend's own state for this build, under its name.
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def interactive(self) -> bool:
        return self.debug or bool(self.break_before or self.break_after)

    @property
    def serial_socket(self) -> Path:
        # A unix socket path holds at most 107 bytes, and a work dir can be longer: it lives in
        # the build key's private temp folder, which is removed with the key.
        base = self.key_file.parent if self.key_file is not None else self.work_dir
        return base / "serial.sock"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "packer.log"

    @property
    def packer_manifest(self) -> Path:
        return self.work_dir / "packer-manifest.json"

    @property
    def image_manifest(self) -> Path:
        return self.image.directory / "manifest.json"

    @property
    def mirror_dest(self) -> str:
        return f"builds/{self.image.name}/{self.version}"

    def mirror(self) -> Mirror:
        """The site's mirror, opened for this build."""
        from osimage.publish.mirror import open_mirror

        return open_mirror(self.site.mirror_url, self.root, self.site.data["mirror"],
                           accept_new_host_key=self.accept_new_host_key)
