#!/bin/sh
# The smoke guest's root tree as a tar, for the diskless exports (osimage/exports.py): the
# initramfs root plus /data. Runs last in the VM; Packer downloads $OSIMAGE_ROOTFS_OUTPUT.
# The mount points of the pseudo filesystems stay, empty; their content, caches, the machine's
# identity (machine-id, host keys) and the tar itself are left out. busybox tar has no -T or
# --exclude, so the kept names go to it as arguments with --no-recursion (a few hundred here).
set -eu
out=${OSIMAGE_ROOTFS_OUTPUT:?}
case $out in /tmp/*) ;; *) echo "rootfs.sh: $out must be under /tmp (left out of the tar)" >&2; exit 1 ;; esac
mkdir -p "$(dirname "$out")"
rm -f "$out"
sync
cd /
names=$(find . \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \
        -o -path ./var/cache -o -path ./data/lost+found \) -prune -print \
    -o \( -path ./etc/machine-id -o -path './etc/ssh/ssh_host_*' \
        -o -path './etc/dropbear/*host_key*' \) \
    -o -print | sort)
set -f
IFS='
'
# shellcheck disable=SC2086 # one argument per line of $names, on purpose
tar -c --no-recursion --numeric-owner -f "$out" $names
unset IFS
set +f
echo "rootfs.sh: $(wc -c <"$out") bytes, $(printf '%s\n' "$names" | wc -l) names in $out"
