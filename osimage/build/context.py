"""The one small object the build's stages share."""

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
    from osimage.features.patches import AppliedPatches


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
    patches: AppliedPatches | None = None  # the release's patch tarball, verified
    http_dir: Path | None = None  # http_directory rendered for this build (osimage/features/httpdir.py)
    payload: Any = None  # payload.Payload: a release's image embedded in this one
    libvirt: Any = None  # libvirt_steps.LibvirtBuild: hypervisor connection, domain name
    exports: Any = None  # exports.Exports: the diskless outputs (rootfs, squashfs, OCI)

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
