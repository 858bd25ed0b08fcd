#!/bin/bash
# Makes the next security-patch tarball on Rocky 8: runs LAST in a
# `./build.py rocky8-base --create-patches` build, after the image's own steps, so the
# advisories are those that apply to everything the image installs. Needs the Rocky
# repositories (the build host's network, or an upstream mirror configured by the image).
#
# Leaves at $OSIMAGE_PATCHES_OUTPUT a tarball in the patch format (osimage/features/patchindex.py):
#   advisories.txt       `dnf updateinfo list --security` lines: ADVISORY TYPE/SEVERITY NEVRA
#   *.rpm                the packages that fix them, with the dependencies not installed yet
#   repodata/            createrepo_c metadata (gzip: what the host reads to index and check it)
set -euo pipefail

out=${OSIMAGE_PATCHES_OUTPUT:?}
work=$(mktemp -d /var/tmp/osimage-patches.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"

dnf --assumeyes --quiet install createrepo_c tar gzip
dnf --quiet makecache --refresh

# The security advisories with updates for this system (one line per advisory and package).
dnf --quiet updateinfo list --security --available | awk 'NF == 3' > "$work/advisories.txt"
advisories=$(cut -d' ' -f1 "$work/advisories.txt" | sort -u | wc -l)

# The newest packages that fix them and the dependencies they pull in, downloaded only.
dnf --assumeyes --quiet upgrade --security --downloadonly --downloaddir="$work"
packages=$(find "$work" -maxdepth 1 -name '*.rpm' | wc -l)

createrepo_c --quiet --general-compress-type=gz "$work"

mkdir -p "$(dirname "$out")"
tar --create --gzip --file "$out" --directory "$work" \
    --owner=0 --group=0 --numeric-owner --sort=name .
echo "create.sh: $advisories advisories, $packages packages: $(du -h "$out" | cut -f1) in $out"
