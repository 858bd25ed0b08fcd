#!/bin/sh
# Writes a marker onto the data partition (mounted at /data), so a test can read it back out
# of the artifact and prove that provisioning reached the disk.
set -eu
printf 'osimage smoke marker\nimage=%s\nversion=%s\ncommit=%s\n' \
    "$OSIMAGE_IMAGE" "$OSIMAGE_VERSION" "$OSIMAGE_COMMIT" > /data/marker
sync
cat /data/marker
