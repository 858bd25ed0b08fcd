"""NAME-oci.tar: the export's OCI image as one archive that OCI tools and Warewulf both read.

It is an OCI image layout (oci-layout, index.json, blobs/sha256/...: skopeo's and podman's
`oci-archive:`) that also carries Docker's manifest.json naming the same config and layer
blobs (`docker-archive:`, as `docker save` of Docker 25 writes it). The second view is the one
Warewulf needs: `wwctl image import FILE` (4.6; `wwctl container import FILE` in 4.5) opens any
local file as `docker-archive:` (internal/pkg/oci/puller.go, getReference), which takes the one
image in manifest.json and decompresses its gzip layer itself.

The archive is written here rather than by `skopeo copy ... oci-archive:`, whose tar records
the file times of a temporary folder: each member is dated SOURCE_DATE_EPOCH, owned by 0:0 and
in a fixed order, so the same layout gives the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from osimage.errors import BuildError


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algo / hexdigest


def _json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def image_of(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The index descriptor of the image tagged `tag` in the layout, and its manifest."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return desc, json.loads(_blob(layout, desc["digest"]).read_bytes())
    raise BuildError(f"{layout}: no image tagged {tag!r} in index.json")


def write_archive(layout: Path, tag: str, repo_tag: str, out: Path, epoch: int) -> None:
    """out: the image `tag` of the layout, only the blobs it references, as an OCI layout plus
    Docker's manifest.json (RepoTags [repo_tag]), dated epoch."""
    desc, manifest = image_of(layout, tag)
    config = manifest["config"]["digest"]
    layers = [layer["digest"] for layer in manifest["layers"]]
    docker = [{"Config": f"blobs/{config.replace(':', '/')}", "RepoTags": [repo_tag],
               "Layers": [f"blobs/{d.replace(':', '/')}" for d in layers]}]
    metadata = {
        "oci-layout": _json({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json({"schemaVersion": 2, "manifests": [desc]}),
        "manifest.json": _json(docker),
    }
    blobs = sorted({desc["digest"], config, *layers})

    def info(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
        member = tarfile.TarInfo(name)
        member.type, member.size, member.mtime = kind, size, epoch
        member.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    out.unlink(missing_ok=True)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in metadata.items():
            t.addfile(info(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))
        algos = sorted({d.split(":", 1)[0] for d in blobs})
        t.addfile(info("blobs", tarfile.DIRTYPE))
        for algo in algos:
            t.addfile(info(f"blobs/{algo}", tarfile.DIRTYPE))
        for digest in blobs:
            path = _blob(layout, digest)
            with path.open("rb") as f:
                t.addfile(info(f"blobs/{digest.replace(':', '/')}", tarfile.REGTYPE,
                               path.stat().st_size), f)
