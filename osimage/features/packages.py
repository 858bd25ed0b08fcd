"""What is installed in the image: its package list and a CycloneDX SBOM, made by every build.

Last in the VM (after every provisioner, the image's cleanup included, so it describes what
ships), osimage/features/packages_list.sh queries the package manager's own database: rpm
(`rpm -qa` with a query format) or dpkg (`dpkg-query -W`, licences from machine-readable
/usr/share/doc/*/copyright); the smoke image, which has no package manager, carries the list
of the Debian packages scripts/make-smoke-disk.sh made it from. Packer downloads the list, and
on the host it becomes, beside the disk:

    IMAGE.packages.json   name, epoch, version, release, arch, source package, licences, purl
    IMAGE.cdx.json        a CycloneDX 1.6 SBOM (cyclonedx-python-lib), purls pkg:deb/... and
                          pkg:rpm/...

Both are hashed, published and recorded with their kind ("packages", "sbom") like the exports,
and `./build.py release diff` compares them (osimage/release/diff.py). A layered image (image.yaml
`parent:`) lists everything installed, the parent's packages included; its record names the
parent's list.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from osimage.build.context import BuildContext
from osimage.build.feature import Feature, Step
from osimage.errors import BuildError
from osimage.fsutil import atomic_write_text
from osimage.publish import artifacts
from osimage.release import image_manifest
from osimage.release.versions import deb_version, split_deb
from osimage.sizes import human

NAME = "packages"
SCRIPT = Path(__file__).with_name("packages_list.sh")
# in RAM (tmpfs on Rocky and Debian; smoke's root is a ramfs), so no provisioner has to take
# it off the disk again: one Packer provisioner less is a second less under TCG
IN_VM = "/dev/shm/osimage-packages.txt"
FORMAT = "osimage-packages/1"
KINDS = ("packages", "sbom")


@dataclass(frozen=True)
class Package:
    name: str
    epoch: str
    version: str
    release: str  # rpm's release, dpkg's Debian revision
    arch: str
    source: str = ""  # the source package (dpkg) or source rpm (rpm)
    licenses: tuple[str, ...] = ()

    @property
    def evr(self) -> tuple[str, str, str]:
        return self.epoch, self.version, self.release

    def full_version(self, manager: str) -> str:
        if manager == "rpm":
            return (f"{self.epoch + ':' if self.epoch else ''}{self.version}"
                    f"{'-' + self.release if self.release else ''}")
        return deb_version(*self.evr)


@dataclass
class PackageList:
    manager: str  # rpm, dpkg, or none (an image without a package database)
    os_id: str = ""
    os_version: str = ""
    packages: list[Package] = field(default_factory=list)

    def purl(self, p: Package) -> str:
        from packageurl import PackageURL

        qualifiers = {"arch": p.arch}
        if self.os_version:
            qualifiers["distro"] = f"{self.os_id}-{self.os_version}"
        if self.manager == "rpm":
            if p.epoch:
                qualifiers["epoch"] = p.epoch
            version = f"{p.version}-{p.release}" if p.release else p.version
            return str(PackageURL("rpm", self.os_id or None, p.name, version, qualifiers))
        return str(PackageURL("deb", self.os_id or "debian", p.name, p.full_version("dpkg"),
                              qualifiers))

    def document(self, **about: Any) -> dict[str, Any]:
        """IMAGE.packages.json."""
        return {"format": FORMAT, **about, "manager": self.manager,
                "os": {"id": self.os_id, "version_id": self.os_version},
                "packages": [{**asdict(p), "licenses": list(p.licenses), "purl": self.purl(p)}
                             for p in self.packages]}


class PackageListError(ValueError):
    """The text the guest printed, or a recorded list, is not a package list."""


def parse(text: str) -> PackageList:
    """The output of packages_list.sh."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "osimage-packages 1":
        raise PackageListError("not an osimage package list (no 'osimage-packages 1' line)")
    out = PackageList(manager="")
    licenses: dict[str, list[str]] = {}
    rows: list[list[str]] = []
    for n, line in enumerate(lines[1:], 2):
        word, _, rest = line.partition(" " if not line.startswith(("P\t", "L\t")) else "\t")
        if word == "os":
            out.os_id, _, out.os_version = rest.partition(" ")
        elif word == "manager":
            out.manager = rest.strip()
        elif word == "P":
            rows.append(rest.split("\t"))
        elif word == "L":
            pkg, _, lic = rest.partition("\t")
            licenses.setdefault(pkg, []).append(lic)
        elif line.strip():
            raise PackageListError(f"line {n}: {line[:60]!r} is not a package list line")
    if out.manager not in ("rpm", "dpkg", "none"):
        raise PackageListError(f"manager {out.manager!r}: expected rpm, dpkg or none")
    for row in rows:
        p = _row(out.manager, row, licenses)
        if p is not None:
            out.packages.append(p)
    out.packages.sort(key=lambda p: (p.name, p.arch, p.evr))
    return out


def _row(manager: str, row: list[str], licenses: dict[str, list[str]]) -> Package | None:
    def none(v: str) -> str:
        return "" if v == "(none)" else v

    if manager == "rpm":
        if len(row) != 7:
            raise PackageListError(f"rpm row with {len(row)} fields, not 7: {row[:3]}")
        name, epoch, version, release, arch, source, lic = row
        return Package(name, none(epoch), version, release, none(arch), none(source),
                       (lic,) if none(lic) else ())
    if len(row) != 6:
        raise PackageListError(f"dpkg row with {len(row)} fields, not 6: {row[:3]}")
    status, name, full, arch, source, _source_version = row
    if not status.startswith("ii"):  # removed with its configuration kept, half installed
        return None
    epoch, version, release = split_deb(full)
    return Package(name, epoch, version, release, arch, source or name,
                   tuple(licenses.get(name, ())))


def read_document(data: bytes) -> tuple[str, list[Package]]:
    """(manager, packages) of a recorded IMAGE.packages.json."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise PackageListError(f"format {doc.get('format')!r}, not {FORMAT!r}")
        return str(doc["manager"]), [
            Package(str(p["name"]), str(p["epoch"]), str(p["version"]), str(p["release"]),
                    str(p["arch"]), str(p.get("source", "")), tuple(p.get("licenses", ())))
            for p in doc["packages"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PackageListError(f"not a package list: {e}") from None


# --- CycloneDX ---------------------------------------------------------------------------------


def cyclonedx(plist: PackageList, image: str, version: str, epoch: int) -> str:
    """The SBOM as CycloneDX 1.6 JSON: the same list gives the same bytes (serial number from
    the image and version, timestamp the commit's time, bom-refs the purls)."""
    from cyclonedx.contrib.license.factories import LicenseFactory
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.license import DisjunctiveLicense
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    factory = LicenseFactory()
    subject = Component(type=ComponentType.OPERATING_SYSTEM, name=image, version=version,
                        bom_ref=f"osimage:{image}@{version}")
    bom = Bom(serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"osimage:{image}@{version}"),
              metadata=BomMetaData(component=subject,
                                   timestamp=datetime.fromtimestamp(epoch, UTC)))
    seen: set[str] = set()
    for p in plist.packages:
        purl = plist.purl(p)
        if purl in seen:
            continue
        seen.add(purl)
        # a licence list mixing expressions and names is invalid CycloneDX: one expression
        # alone, else each licence by SPDX id or by name
        lics: list[Any]
        if len(p.licenses) == 1:
            lics = [factory.make_from_string(p.licenses[0])]
        else:
            lics = [factory.make_from_string(lic) for lic in p.licenses]
            lics = [lic if isinstance(lic, DisjunctiveLicense)
                    else DisjunctiveLicense(name=p.licenses[i]) for i, lic in enumerate(lics)]
        bom.components.add(Component(
            type=ComponentType.LIBRARY, name=p.name, version=p.full_version(plist.manager),
            purl=PackageURL.from_string(purl), bom_ref=purl, licenses=lics))
    bom.register_dependency(subject, list(bom.components))
    text: str = JsonV1Dot6(bom).output_as_string(indent=2)
    return text + "\n"


# --- the build ---------------------------------------------------------------------------------


def out_dir(ctx: BuildContext) -> Path:
    return ctx.work_dir / "packages"


def listed_path(ctx: BuildContext) -> Path:
    """Where Packer downloads the guest's list to."""
    return out_dir(ctx) / f"{ctx.image.name}.packages.txt"


def wanted(ctx: BuildContext) -> bool:
    return not ctx.create_patches  # its VM is no release image, and nothing is recorded


def parent_list(ctx: BuildContext) -> dict[str, Any] | None:
    """The parent's package list, for a layered image (image.yaml `parent:`): that of the
    parent build the layer starts from (features/parent.py), else of its latest recorded
    build. The layered list itself is complete: the guest's database holds the parent's
    packages too."""
    parent = ctx.image.data.get("parent")
    if not parent:
        return None
    from osimage.features import parent as layer  # parent imports nothing of this module

    started = layer.of(ctx)
    path = ctx.root / "images" / str(parent) / "manifest.json"
    found: dict[str, Any] = {"image": parent, "file": None}
    with contextlib.suppress(Exception):  # a parent never built: named, without a file
        for build in reversed(image_manifest.read(path)["builds"]):
            data = build.get("custom_data") or {}
            if started is not None and data.get("version") != started.version:
                continue
            for f in build.get("files") or []:
                if f.get("kind") == "packages":
                    found.update(version=data.get("version"), file=f["name"],
                                 mirror_path=data.get("mirror_path"),
                                 sha256=(data.get("sha256") or {}).get(f["name"]))
                    return found
    return found


@dataclass
class Listed:
    manager: str
    count: int
    parent: dict[str, Any] | None


def step_packages(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """IMAGE.packages.json and IMAGE.cdx.json from the list Packer downloaded; hashed."""
    from osimage.features.exports import source_date_epoch

    got = listed_path(ctx)
    if not got.is_file() or got.stat().st_size == 0:
        raise BuildError(f"the package-list step left no list at {IN_VM} in the VM",
                         hint=f"see {ctx.log_file}")
    try:
        plist = parse(got.read_text(errors="replace"))
    except PackageListError as e:
        raise BuildError(f"{got.name}: {e}", hint=f"see {ctx.log_file}") from None
    if plist.manager == "none":
        ctx.reporter.warn(f"{ctx.image.name}: the guest has no rpm or dpkg database: "
                          "its package list is empty")
    parent = parent_list(ctx)
    about = {"image": ctx.image.name, "version": ctx.version, "git_commit": ctx.git.commit,
             "complete": True, "parent": parent}
    doc = out_dir(ctx) / f"{ctx.image.name}.packages.json"
    sbom = out_dir(ctx) / f"{ctx.image.name}.cdx.json"
    atomic_write_text(doc, json.dumps(plist.document(**about), indent=1) + "\n")
    atomic_write_text(sbom, cyclonedx(plist, ctx.image.name, ctx.version,
                                      int(source_date_epoch(ctx))))
    ctx.state[NAME] = Listed(plist.manager, len(plist.packages), parent)
    ctx.reporter.info(f"    {len(plist.packages)} packages ({plist.manager})")
    for path, kind in ((doc, "packages"), (sbom, "sbom")):
        made = replace(artifacts.record(path), kind=kind)
        ctx.artifacts.append(made)
        ctx.reporter.info(f"    {made.name}: {human(made.size)}, sha256 {made.sha256}")


class PackageLists(Feature):
    name = NAME
    recorded = True

    def steps(self, ctx: BuildContext) -> list[Step]:
        return [Step("list packages", step_packages, at="after artifacts")] if wanted(ctx) \
            else []

    def provisioners(self, ctx: BuildContext, provs: list[dict[str, Any]],
                     env: dict[str, str]) -> list[dict[str, Any]]:
        if not wanted(ctx):
            return provs
        shutil.rmtree(out_dir(ctx), ignore_errors=True)
        out_dir(ctx).mkdir(parents=True)  # Packer's download does not truncate: start empty
        merged = {**env, "OSIMAGE_PACKAGES_OUTPUT": IN_VM}
        return [*provs,
                {"name": "list-packages", "type": "shell", "script": str(SCRIPT),
                 "env_list": [f"{k}={v}" for k, v in sorted(merged.items())]},
                {"name": "download-packages", "type": "file", "direction": "download",
                 "source": IN_VM, "destination": str(listed_path(ctx))}]

    def record(self, ctx: BuildContext) -> dict[str, Any] | None:
        """The manifest entry's `packages`: its files' kinds, the manager, the count, and
        for a layered image the parent's list."""
        listed: Listed | None = ctx.state.get(NAME)
        if listed is None:
            return None
        return {"files": {a.name: a.kind for a in ctx.artifacts if a.kind in KINDS},
                "manager": listed.manager, "count": listed.count, "parent": listed.parent}

    def inputs(self, ctx: BuildContext) -> bytes:
        return SCRIPT.read_bytes() if wanted(ctx) else b""


FEATURE = PackageLists()
