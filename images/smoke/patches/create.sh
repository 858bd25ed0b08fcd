#!/bin/sh
# Makes a smoke patch tarball: the test image's stand-in for rocky8-base's patches/create.sh.
# Runs last in a `--create-patches` build (busybox sh) and leaves at $OSIMAGE_PATCHES_OUTPUT a
# tarball in the patch format (osimage/features/patchindex.py): advisories.txt, one line per advisory
# and package as `dnf updateinfo list --security` prints them, naming what really runs in this
# VM (its busybox and kernel), and files/ for patches/apply.sh to install on /data.
set -eu
out=${OSIMAGE_PATCHES_OUTPUT:?}
work=$(mktemp -d /tmp/osimage-patches.XXXXXX)
busybox_version=$(busybox | sed -n '1s/^BusyBox v\([^ ]*\).*/\1/p')
kernel=$(uname -r)
year=$(date -u +%Y)

mkdir -p "$work/files/patches"
printf 'patched-by=%s\ncommit=%s\nbusybox=%s\nkernel=%s\n' \
    "$OSIMAGE_VERSION" "$OSIMAGE_COMMIT" "$busybox_version" "$kernel" \
    > "$work/files/patches/level"
{
    printf 'SMOKE-%s:0001 Important/Sec. busybox-%s.x86_64\n' "$year" "$busybox_version"
    printf 'SMOKE-%s:0002 Moderate/Sec. linux-image-%s.x86_64\n' "$year" "$kernel"
} > "$work/advisories.txt"
mkdir -p "$(dirname "$out")"
tar -c -z -f "$out" -C "$work" advisories.txt files
rm -rf "$work"
ls -l "$out"
