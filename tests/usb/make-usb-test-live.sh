#!/usr/bin/env bash
# The source of tests/usb/usb-installer-test (the tests' stand-in for images/usb-installer):
# a live ISO made from Debian packages, playing the part of the Alpine live ISO, which cannot
# be downloaded in the tests. Like Alpine's, it boots into RAM, lets the build log in over SSH
# (with the key qemu hands over by fw_cfg, see scripts/make-smoke-disk.sh) and carries the tools
# images/usb-installer/compose/compose.sh runs and the boot media compose.sh copies onto the
# stick: here a Debian kernel and a busybox initramfs that mounts the stick's payload partition
# and runs the stick's osimage-install unattended (osimage.target=/dev/vdb osimage.yes), for
# BIOS (syslinux.cfg) and for UEFI (a grub EFI loader that finds the stick by /.osimage-usb).
#
# Usage: tests/usb/make-usb-test-live.sh OUTDIR
#   Writes OUTDIR/usb-test-live.iso and OUTDIR/usb-test-live.iso.sha256 (sha256sum format).
#
# Host packages: those of scripts/make-smoke-disk.sh, and xorriso, isolinux, grub-efi-amd64-bin,
# grub-common, util-linux (sfdisk), dosfstools, e2fsprogs, mtools.
set -euo pipefail

die() { echo "make-usb-test-live: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUTDIR=$1

export LC_ALL=C TZ=UTC
umask 022
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export SOURCE_DATE_EPOCH

readonly VIRTIO="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net"
readonly LIVE_MODULES="$VIRTIO qemu_fw_cfg fat vfat nls_cp437 nls_ascii nls_utf8"
readonly FW_CFG_KEYS=/sys/firmware/qemu_fw_cfg/by_name/opt/osimage/authorized_keys/raw
# what the stick boots with, for BIOS (syslinux) and UEFI (grub): the installer writes the
# payload to the second disk and the VM powers off
readonly STICK_CMDLINE="console=ttyS0,115200n8 panic=10 osimage.target=/dev/vdb osimage.yes"

KERNEL_VERSION=${KERNEL_VERSION:-$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' -printf '%f\n' \
    | sed 's/^vmlinuz-//' | sort -V | tail -n 1)}
[ -n "$KERNEL_VERSION" ] || die "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)"
KERNEL=/boot/vmlinuz-$KERNEL_VERSION
MODDIR=/lib/modules/$KERNEL_VERSION
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
ISOLINUX=/usr/lib/ISOLINUX/isolinux.bin
ISOHDPFX=/usr/lib/ISOLINUX/isohdpfx.bin
LDLINUX=/usr/lib/syslinux/modules/bios/ldlinux.c32
for f in "$KERNEL" /bin/busybox /usr/sbin/dropbear /usr/bin/scp "$MBR_BIN" "$ISOLINUX" "$ISOHDPFX" \
         "$LDLINUX" /usr/lib/grub/x86_64-efi/linux.mod /etc/mke2fs.conf; do
    [ -r "$f" ] || die "missing $f"
done
for t in sfdisk mkfs.vfat mke2fs syslinux mtools xorriso grub-mkstandalone cpio gzip ldd; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/usb-test-live.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- helpers -------------------------------------------------------------------------------------

busybox_tree() {  # ROOT: busybox and its applet links
    local root=$1 applet d
    for d in bin sbin usr/bin usr/sbin etc dev proc sys tmp run root lib/modules media mnt; do
        mkdir -p "$root/$d"
    done
    chmod 1777 "$root/tmp"
    install -m 0755 /bin/busybox "$root/bin/busybox"
    while read -r applet; do
        [ "$applet" = bin/busybox ] && continue
        if [ -e "$root/$applet" ] || [ -L "$root/$applet" ]; then continue; fi
        mkdir -p "$root/$(dirname "$applet")"
        case $applet in
            */*/*) ln -s ../../bin/busybox "$root/$applet" ;;
            *) ln -s ../bin/busybox "$root/$applet" ;;
        esac
    done < <(/bin/busybox --list-full | sort)
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    printf 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n' >"$root/etc/profile"
}

binaries() {  # ROOT BINARY...: the binaries (over busybox applets) and the libraries ldd lists
    local root=$1 b lib
    shift
    for b in "$@"; do
        rm -f "$root$b"
        mkdir -p "$root$(dirname "$b")"
        cp -L "$b" "$root$b"
        chmod 0755 "$root$b"
    done
    ldd "$@" 2>/dev/null \
        | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' \
        | sort -u \
        | while read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
            chmod 0755 "$root$lib"
        done
}

modules() {  # ROOT MODULE...: kernel modules, decompressed, as /lib/modules/NAME.ko
    local root=$1 m src
    shift
    for m in "$@"; do
        src=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n 1)
        [ -n "$src" ] || die "module $m not found under $MODDIR"
        case $src in
            *.ko) cp "$src" "$root/lib/modules/$m.ko" ;;
            *.xz) xz -dc "$src" >"$root/lib/modules/$m.ko" ;;
            *.zst) zstd -qdc "$src" >"$root/lib/modules/$m.ko" ;;
        esac
    done
}

cpio_gz() {  # ROOT OUT
    find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    (cd "$1" && find . | sort | cpio --quiet --reproducible -o -H newc -R 0:0) | gzip -n -9 >"$2"
}

# --- the stick's system: runs osimage-install from the payload partition ------------------------

STICK=$WORK/stick
busybox_tree "$STICK"
# shellcheck disable=SC2086  # a list of names
modules "$STICK" $VIRTIO
cat >"$STICK/init" <<END_INIT
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $VIRTIO; do insmod /lib/modules/\$m.ko 2>/dev/null; done
echo "usb-test: the stick's system is up"
i=0
until dev=\$(findfs LABEL=osimage-data 2>/dev/null); do
    i=\$((i + 1))
    [ \$i -ge 100 ] && break
    sleep 0.1
done
mkdir -p /media/osimage-data
if [ -n "\$dev" ] && mount -t ext4 -o ro "\$dev" /media/osimage-data; then
    /media/osimage-data/osimage-install --cmdline
    echo "usb-test: osimage-install exit status \$?"
else
    echo "usb-test: no payload partition (LABEL=osimage-data)"
fi
sync
poweroff -f
END_INIT
chmod 0755 "$STICK/init"

MEDIA=$WORK/media  # what compose.sh copies onto the stick's FAT partition
mkdir -p "$MEDIA/boot/syslinux" "$MEDIA/boot/grub" "$MEDIA/efi/boot"
cp "$KERNEL" "$MEDIA/boot/vmlinuz"
cpio_gz "$STICK" "$MEDIA/boot/initrd.gz"
cat >"$MEDIA/boot/syslinux/syslinux.cfg" <<END_CFG
SERIAL 0 115200
DEFAULT stick
PROMPT 0
TIMEOUT 0
LABEL stick
  LINUX /boot/vmlinuz
  INITRD /boot/initrd.gz
  APPEND $STICK_CMDLINE osimage.boot=bios
END_CFG
cat >"$MEDIA/boot/grub/grub.cfg" <<END_CFG
serial --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "usb-test stick" {
    linux /boot/vmlinuz $STICK_CMDLINE osimage.boot=uefi
    initrd /boot/initrd.gz
}
END_CFG
cat >"$WORK/early.cfg" <<'END_CFG'
search --no-floppy --file /.osimage-usb --set=root
configfile ($root)/boot/grub/grub.cfg
END_CFG
grub-mkstandalone --format=x86_64-efi --output="$MEDIA/efi/boot/bootx64.efi" \
    --locales="" --fonts="" --themes="" \
    --install-modules="normal configfile search search_fs_file part_msdos part_gpt fat linux echo serial terminal" \
    --modules="part_msdos part_gpt fat search search_fs_file configfile" \
    "boot/grub/grub.cfg=$WORK/early.cfg"

# --- the live system of the build: SSH, compose.sh's tools, the boot media ----------------------

LIVE=$WORK/live
busybox_tree "$LIVE"
mkdir -p "$LIVE/etc/dropbear" "$LIVE/root/.ssh" "$LIVE/usr/lib/syslinux/mbr"
chmod 0700 "$LIVE/root" "$LIVE/root/.ssh" "$LIVE/etc/dropbear"
binaries "$LIVE" /usr/sbin/dropbear /usr/bin/scp "$(command -v sfdisk)" "$(command -v mkfs.vfat)" \
    "$(command -v mke2fs)" /usr/bin/syslinux /usr/bin/mtools
ln -sf "$(command -v mke2fs)" "$LIVE/usr/sbin/mkfs.ext4"
for m in mcopy mattrib mmove mdel mdir mmd; do ln -sf mtools "$LIVE/usr/bin/$m"; done
cp /etc/mke2fs.conf "$LIVE/etc/mke2fs.conf"
# mtools (under syslinux) converts names to the FAT's codepage 850 with glibc's iconv
GCONV=/usr/lib/x86_64-linux-gnu/gconv
mkdir -p "$LIVE$GCONV"
cp -a "$GCONV/gconv-modules" "$GCONV/gconv-modules.d" "$GCONV/IBM850.so" "$GCONV/IBM437.so" "$LIVE$GCONV/"
cp "$MBR_BIN" "$LIVE/usr/lib/syslinux/mbr/mbr.bin"
# shellcheck disable=SC2086  # a list of names
modules "$LIVE" $LIVE_MODULES
cp -a "$MEDIA" "$LIVE/boot-media"
printf 'root:*:19000:0:99999:7:::\n' >"$LIVE/etc/shadow"
chmod 0600 "$LIVE/etc/shadow"
printf '/bin/sh\n' >"$LIVE/etc/shells"
printf 'usb-test-live\n' >"$LIVE/etc/hostname"
: >"$LIVE/root/.ssh/authorized_keys"
chmod 0600 "$LIVE/root/.ssh/authorized_keys"
cat >"$LIVE/etc/udhcpc.script" <<'END_DHCP'
#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface" && break; done
        ;;
esac
exit 0
END_DHCP
chmod 0755 "$LIVE/etc/udhcpc.script"
cat >"$LIVE/init" <<END_INIT
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
hostname -F /etc/hostname
for m in $LIVE_MODULES; do insmod /lib/modules/\$m.ko || echo "usb-test-live: insmod \$m failed"; done
if [ -r $FW_CFG_KEYS ]; then
    cat $FW_CFG_KEYS >>/root/.ssh/authorized_keys
    echo >>/root/.ssh/authorized_keys
fi
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 1 || echo "usb-test-live: DHCP failed"
dropbear -R -E -p 22
echo "usb-test-live: ready"
exec /sbin/init
END_INIT
chmod 0755 "$LIVE/init"
printf '::shutdown:/bin/sync\nttyS0::askfirst:-/bin/sh\n' >"$LIVE/etc/inittab"

# --- the ISO (BIOS, El Torito with isolinux; hybrid MBR as the Alpine ISO has) ------------------

ISO=$WORK/iso
mkdir -p "$ISO/isolinux" "$ISO/live"
cp "$ISOLINUX" "$LDLINUX" "$ISO/isolinux/"
cp "$KERNEL" "$ISO/live/vmlinuz"
cpio_gz "$LIVE" "$ISO/live/live.gz"
cat >"$ISO/isolinux/isolinux.cfg" <<'END_CFG'
SERIAL 0 115200
DEFAULT live
PROMPT 0
TIMEOUT 0
LABEL live
  LINUX /live/vmlinuz
  INITRD /live/live.gz
  APPEND console=ttyS0,115200n8 panic=10 quiet
END_CFG
find "$ISO" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
xorriso -as mkisofs -quiet -o "$WORK/usb-test-live.iso" -V OSIMAGE_TEST_LIVE \
    -isohybrid-mbr "$ISOHDPFX" -c isolinux/boot.cat -b isolinux/isolinux.bin \
    -no-emul-boot -boot-load-size 4 -boot-info-table "$ISO"

mkdir -p "$OUTDIR"
sum=$(sha256sum "$WORK/usb-test-live.iso" | cut -d' ' -f1)
mv -f "$WORK/usb-test-live.iso" "$OUTDIR/usb-test-live.iso"
printf '%s  usb-test-live.iso\n' "$sum" >"$OUTDIR/usb-test-live.iso.sha256"
echo "usb test live ISO: $OUTDIR/usb-test-live.iso (sha256 $sum, kernel $KERNEL_VERSION)"
