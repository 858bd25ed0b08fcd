"""The backends a site may name (site.yaml backend:), each loaded only when a build uses it."""

from __future__ import annotations

import importlib

from osimage.build.context import BuildContext
from osimage.build.feature import Backend

BACKENDS = {
    "qemu": "osimage.backends.qemu",  # Packer's qemu builder on this machine
    # libvirt.driver: native (the default): osimage runs the domain, Packer provisions it
    "libvirt": "osimage.backends.libvirt.nativebuild",
}
# libvirt.driver: plugin: Packer's libvirt plugin runs the domain (sites already running it)
PLUGIN = "osimage.backends.libvirt.steps"


def backend_of(ctx: BuildContext) -> Backend:
    module = BACKENDS[ctx.site.backend]
    if ctx.site.backend == "libvirt" and (ctx.site.data.get("libvirt") or {}).get(
            "driver", "native") == "plugin":
        module = PLUGIN
    backend: Backend = importlib.import_module(module).BACKEND
    return backend
