#!/usr/bin/env bash
# The smoke image's diskless boot files, made on the host from Debian packages: the cloud
# kernel as vmlinuz-KVER and initramfs-KVER.img, a busybox initramfs that mounts a squashfs
# root (the image's NAME.squashfs, attached as a virtio disk) read-only with a tmpfs overlay
# over it, and switches to it. A smoke build with outputs.boot uploads both into /boot of the
# guest (a file provisioner), as Rocky's /boot holds its kernel and a dracut initramfs, so the
# export takes them out of the root tree the same way for both.
#
# Usage: images/smoke/diskless/make-boot-files.sh OUTDIR
# Kernel command line: osimage.root=/dev/vda (default) osimage.poweroff (stop after the marker)
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 1; }
OUTDIR=$1
export LC_ALL=C TZ=UTC
umask 022
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
if [ -z "${KERNEL_VERSION:-}" ]; then
    KERNEL_VERSION=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' -printf '%f\n' \
        | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
fi
[ -n "$KERNEL_VERSION" ] || { echo "no /boot/vmlinuz-*-cloud-amd64" >&2; exit 1; }
MODDIR=/lib/modules/$KERNEL_VERSION
readonly MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk squashfs overlay"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/smoke-boot.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/initramfs
mkdir -p "$ROOT"/{bin,dev,proc,sys,newroot,ro,rw,lib/modules}
install -m 0755 /bin/busybox "$ROOT/bin/busybox"
for applet in sh mount umount mkdir cat sleep insmod switch_root poweroff grep echo; do
    ln -s busybox "$ROOT/bin/$applet"
done
for m in $MODULES; do
    src=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n 1)
    [ -n "$src" ] || { echo "module $m not found under $MODDIR" >&2; exit 1; }
    case $src in
        *.ko) cp "$src" "$ROOT/lib/modules/$m.ko" ;;
        *.xz) xz -dc "$src" >"$ROOT/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" >"$ROOT/lib/modules/$m.ko" ;;
    esac
done
cat >"$ROOT/init" <<INIT
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $MODULES; do insmod /lib/modules/\$m.ko; done
root=/dev/vda
for arg in \$(cat /proc/cmdline); do
    case \$arg in osimage.root=*) root=\${arg#osimage.root=} ;; esac
done
i=0
while [ ! -b "\$root" ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
mount -t squashfs -o ro "\$root" /ro || { echo "osimage-diskless: cannot mount \$root"; poweroff -f; }
echo "osimage-diskless: squashfs root mounted from \$root"
[ -r /ro/data/marker ] && cat /ro/data/marker
if grep -qw osimage.poweroff /proc/cmdline; then
    umount /ro
    poweroff -f
fi
# a writable root: tmpfs over the read-only squashfs
mount -t tmpfs tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot
exec switch_root /newroot /sbin/init
INIT
chmod 0755 "$ROOT/init"
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$OUTDIR"
(cd "$ROOT" && find . | sort | cpio --quiet --reproducible -o -H newc -R 0:0) \
    | gzip -n -9 >"$OUTDIR/initramfs-$KERNEL_VERSION.img"
cp "/boot/vmlinuz-$KERNEL_VERSION" "$OUTDIR/vmlinuz-$KERNEL_VERSION"
touch -d "@$SOURCE_DATE_EPOCH" "$OUTDIR/vmlinuz-$KERNEL_VERSION" "$OUTDIR/initramfs-$KERNEL_VERSION.img"
echo "$OUTDIR/vmlinuz-$KERNEL_VERSION"
echo "$OUTDIR/initramfs-$KERNEL_VERSION.img"
