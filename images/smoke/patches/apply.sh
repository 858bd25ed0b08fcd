#!/bin/sh
# Applies a smoke patch tarball: the test image's stand-in for rocky8-base's patches/apply.sh.
# Runs first in a `--release X` build (busybox sh). Checks the tarball's sha256 again inside the
# VM, unpacks it, copies its files/ onto the data partition (/data: the only part of the smoke
# disk that persists) and writes /data/patches-applied: name, sha256 and the advisories, which
# the tests read back out of the artifact.
set -eu
tarball=${OSIMAGE_PATCHES:?}
name=${OSIMAGE_PATCHES_NAME:?}
sha256=${OSIMAGE_PATCHES_SHA256:?}

echo "$sha256  $tarball" | sha256sum -c -

# busybox tar does not detect compression on its own
case $(head -c 4 "$tarball" | od -An -tx1 | tr -d ' \n') in
    1f8b*) unpack=-z ;;
    fd377a58) unpack=-J ;;
    425a68*) unpack=-j ;;
    *) unpack= ;;
esac
work=$(mktemp -d /tmp/osimage-patches.XXXXXX)
# shellcheck disable=SC2086  # $unpack is one option or nothing
tar -x $unpack -o -f "$tarball" -C "$work"
test -f "$work/advisories.txt" || { echo "apply.sh: $name has no advisories.txt" >&2; exit 1; }
if [ -d "$work/files" ]; then
    cp -a "$work/files/." /data/
fi
{
    printf 'name=%s\nsha256=%s\nadvisories:\n' "$name" "$sha256"
    cat "$work/advisories.txt"
} > /data/patches-applied
rm -rf "$work" "$tarball"
sync
cat /data/patches-applied
