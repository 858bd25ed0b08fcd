#!/bin/sh
# The provisioned root tree as a tar, for the diskless exports (osimage/features/exports.py:
# Warewulf 4, OpenCHAMI). Runs last in the VM, after cleanup.sh; Packer downloads
# $OSIMAGE_ROOTFS_OUTPUT from a tmpfs. It leaves out the pseudo filesystems' content (their
# mount points stay), caches, temporary files, the machine's identity (machine-id, SSH host
# keys), root's authorized_keys and itself. Reproducible: names sorted, file times clamped to
# $SOURCE_DATE_EPOCH (the commit's time), no atime/ctime and no PID in the pax headers.
set -eu
out=${OSIMAGE_ROOTFS_OUTPUT:?}
epoch=${SOURCE_DATE_EPOCH:?}
case $out in
    /var/tmp/* | /tmp/*) ;;
    *) echo "rootfs.sh: $out must be under /var/tmp or /tmp (left out of the tar)" >&2; exit 1 ;;
esac
# The tar goes to a tmpfs, not to the disk: Packer takes the disk after the download, so a
# tar on the disk would ship inside the image (and its blocks stay in the qcow2 once removed).
# The image's memory must hold it (image.yaml: memory).
dir=$(dirname "$out")
mkdir -p "$dir"
mountpoint -q "$dir" || mount -t tmpfs -o mode=1777,size=90% osimage-rootfs "$dir"
rm -f "$out"
# The root file system alone, through a bind mount: the pseudo filesystems mounted on it
# (/proc, /sys, /dev, /run) show as their empty mount points, and nothing changes under tar.
tree=$(mktemp -d /run/osimage-rootfs.XXXXXX)
trap 'umount "$tree" 2>/dev/null; rmdir "$tree"' EXIT
mount --bind / "$tree"
sync
tar --create --file "$out" --directory "$tree" --numeric-owner --sparse \
    --xattrs --xattrs-include='security.*' --xattrs-include='user.*' \
    --sort=name --mtime="@$epoch" --clamp-mtime --format=posix \
    --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' \
    --exclude="./${out#/}" \
    --exclude='./tmp/*' --exclude='./var/tmp/*' \
    --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' \
    --exclude='./etc/machine-id' --exclude='./etc/ssh/ssh_host_*' \
    --exclude='./root/.ssh/authorized_keys' \
    --exclude='./var/lib/systemd/random-seed' --exclude='./lost+found' \
    .
echo "rootfs.sh: $(stat -c %s "$out") bytes in $out"
