#!/bin/sh
# Applies a smoke patch tarball: the test image's stand-in for rocky8-base's patches/apply.sh.
# Runs first in a `--release X` build (busybox sh). The file it gets is the host's re-pack of the
# checked members of the release's tarball (a plain tar): it checks that file's sha256 again
# inside the VM, unpacks it, copies its files/ onto the data partition (/data: the only part of the smoke
# disk that persists) and writes /data/patches-applied: name, sha256 and the advisories, which
# the tests read back out of the artifact.
set -eu
tarball=${OSIMAGE_PATCHES:?}
name=${OSIMAGE_PATCHES_NAME:?}
sha256=${OSIMAGE_PATCHES_SHA256:?}
repack_sha256=${OSIMAGE_PATCHES_REPACK_SHA256:?}

echo "$repack_sha256  $tarball" | sha256sum -c -

work=$(mktemp -d /tmp/osimage-patches.XXXXXX)
tar -x -o -f "$tarball" -C "$work"
test -f "$work/advisories.txt" || { echo "apply.sh: $name has no advisories.txt" >&2; exit 1; }
if [ -d "$work/files" ]; then
    cp -a "$work/files/." /data/
fi
{
    printf 'name=%s\nsha256=%s\nrepacked_sha256=%s\nadvisories:\n' "$name" "$sha256" \
        "$repack_sha256"
    cat "$work/advisories.txt"
} > /data/patches-applied
rm -rf "$work" "$tarball"
sync
cat /data/patches-applied
