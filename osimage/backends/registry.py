"""The backends a site may name (site.yaml backend:), each loaded only when a build uses it."""

from __future__ import annotations

import importlib

from osimage.build.context import BuildContext
from osimage.build.feature import Backend

BACKENDS = {
    "qemu": "osimage.backends.qemu",  # Packer's qemu builder on this machine
    "libvirt": "osimage.backends.libvirt.steps",  # the libvirt plugin, a pool, a network
}
# libvirt.driver: native: osimage runs the domain itself, Packer provisions over SSH
NATIVE = "osimage.backends.libvirt.nativebuild"


def backend_of(ctx: BuildContext) -> Backend:
    module = BACKENDS[ctx.site.backend]
    if ctx.site.backend == "libvirt" and (ctx.site.data.get("libvirt") or {}).get(
            "driver", "plugin") == "native":
        module = NATIVE
    backend: Backend = importlib.import_module(module).BACKEND
    return backend
