#!/bin/sh
# The smoke guest's root tree as a tar, for the diskless exports (osimage/features/exports.py): the
# initramfs root plus /data. Runs last in the VM; Packer downloads $OSIMAGE_ROOTFS_OUTPUT.
# The mount points of the pseudo filesystems stay, empty; their content, caches, the machine's
# identity (machine-id, host keys), root's authorized_keys (it holds the build's key, handed
# over by fw_cfg at boot) and the tar itself are left out. Every file time is clamped to
# $SOURCE_DATE_EPOCH (the commit's time), so the same tree gives the same tar. busybox tar has
# no -T, --exclude or --mtime: the kept names go to it as arguments with --no-recursion (a few
# hundred here), and the times are clamped on the tree with touch before.
set -eu
out=${OSIMAGE_ROOTFS_OUTPUT:?}
epoch=${SOURCE_DATE_EPOCH:?}
case $out in /tmp/*) ;; *) echo "rootfs.sh: $out must be under /tmp (left out of the tar)" >&2; exit 1 ;; esac
mkdir -p "$(dirname "$out")"
rm -f "$out"
# made before the clamp, so its folder keeps the clamped time; then the reference time
: >"$out"
touch -d "@$epoch" "$out"
sync
cd /
find . \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \
        -o -path ./var/cache -o -path ./data/lost+found \) -prune \
        -newer "$out" -exec touch -h -d "@$epoch" {} + \
    -o -newer "$out" -exec touch -h -d "@$epoch" {} +
names=$(find . \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \
        -o -path ./var/cache -o -path ./data/lost+found \) -prune -print \
    -o \( -path ./etc/machine-id -o -path './etc/ssh/ssh_host_*' \
        -o -path './etc/dropbear/*host_key*' -o -path ./root/.ssh/authorized_keys \) \
    -o -print | sort)
set -f
IFS='
'
# shellcheck disable=SC2086 # one argument per line of $names, on purpose
tar -c --no-recursion --numeric-owner -f "$out" $names
unset IFS
set +f
echo "rootfs.sh: $(wc -c <"$out") bytes, $(printf '%s\n' "$names" | wc -l) names in $out"
