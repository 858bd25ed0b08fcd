"""The features of a build, in the order their provisioners and steps join it: the pipeline
walks this list and never names a feature (osimage/build/feature.py says what one is).

Adding a feature: one module with a FEATURE object, and one line here."""

from __future__ import annotations

from osimage.build.feature import Feature
from osimage.features import debug, exports, httpdir, parent, patches, payload

FEATURES: list[Feature] = [
    parent.FEATURE,  # a layer: the parent image's disk as the source, flattened after Packer
    debug.FEATURE,  # --break-before/--break-after around the image's own provisioners
    patches.FEATURE,  # --release: its patch tarball applied first; --create-patches: made last
    payload.FEATURE,  # a release's image embedded in this one
    httpdir.FEATURE,  # http_directory templates rendered for the build
    exports.FEATURE,  # rootfs, kernel, squashfs, OCI: the rootfs tar made last of all
]
