#!/bin/sh
# Writes a marker and the installed package list (dpkg-query -W) into the image, so a test can
# read them back out of the artifact and later package-list work has a start.
set -eu
mkdir -p /var/lib/osimage
{
    printf 'osimage debian-base marker\nimage=%s\nversion=%s\ncommit=%s\n' \
        "$OSIMAGE_IMAGE" "$OSIMAGE_VERSION" "$OSIMAGE_COMMIT"
    # What PID 1 runs: proves the image boots with systemd as init.
    printf 'pid1=%s\n' "$(readlink /proc/1/exe)"
} >/var/lib/osimage/marker
dpkg-query -W >/var/lib/osimage/packages.txt
sync
cat /var/lib/osimage/marker
