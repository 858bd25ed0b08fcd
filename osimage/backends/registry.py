"""The backends a site may name (site.yaml backend:), each loaded only when a build uses it."""

from __future__ import annotations

import importlib

from osimage.build.context import BuildContext
from osimage.build.feature import Backend

BACKENDS = {
    "qemu": "osimage.backends.qemu",  # Packer's qemu builder on this machine
    "libvirt": "osimage.backends.libvirt.steps",  # the libvirt plugin, a pool, a network
}


def backend_of(ctx: BuildContext) -> Backend:
    backend: Backend = importlib.import_module(BACKENDS[ctx.site.backend]).BACKEND
    return backend
