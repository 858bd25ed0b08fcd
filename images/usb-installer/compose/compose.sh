#!/bin/sh
# Composes the USB installer image on the build VM's disk, in three phases (OSIMAGE_COMPOSE):
#
#   partition  the disk gets an MBR with p1 FAT32 "OSIMAGE" (active: BIOS boots syslinux from it,
#              UEFI boots EFI/BOOT/BOOTX64.EFI from it) and p2 ext4 "osimage-data" over the rest;
#              p2 is mounted at OSIMAGE_PAYLOAD_DIR, where Packer then uploads the payload (the
#              release's disk image) and the installer
#   boot       the live system's boot media (OSIMAGE_BOOT_MEDIA: kernel, initramfs, syslinux and
#              grub configurations, EFI loader) is copied to p1, syslinux is installed into p1
#              and its MBR code into the disk; p1 stays mounted at /mnt/osimage-boot so that
#              an image's own step can add to it (Alpine's overlay)
#   finish     the payload's size and sha256 are checked against the release's (OSIMAGE_PAYLOAD_*),
#              payload.env and NAME.sha256 are written beside it, everything is unmounted
#
# The boot media must hold boot/syslinux/syslinux.cfg (or isolinux.cfg) for BIOS and
# efi/boot/bootx64.efi for UEFI. An EFI loader finds its partition by the file /.osimage-usb
# this script writes on p1 (grub: search --file /.osimage-usb).
#
# POSIX sh: runs on Alpine (production) and on the tests' busybox live system. Needs sfdisk,
# mkfs.vfat, mkfs.ext4, syslinux (with mtools) and its mbr.bin, sha256sum.
set -eu

phase=${OSIMAGE_COMPOSE:?set OSIMAGE_COMPOSE to partition, boot or finish}
disk=${OSIMAGE_TARGET_DISK:-/dev/vda}
boot_mib=${OSIMAGE_BOOT_MIB:-2048}
data_dir=${OSIMAGE_PAYLOAD_DIR:-/mnt/osimage-payload}
boot_dir=/mnt/osimage-boot
boot_label=OSIMAGE
data_label=osimage-data

say() { echo "compose: $*"; }
die() { echo "compose: $*" >&2; exit 1; }

# /dev/vda -> /dev/vda1, /dev/nvme0n1 -> /dev/nvme0n1p1
part() {
    case $disk in
        *[0-9]) echo "${disk}p$1" ;;
        *) echo "$disk$1" ;;
    esac
}

wait_for() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -le 100 ] || die "$1 did not appear"
        sleep 0.1
    done
}

mbr_bin() {
    for f in /usr/share/syslinux/mbr.bin /usr/lib/syslinux/mbr/mbr.bin /usr/lib/SYSLINUX/mbr.bin; do
        if [ -r "$f" ]; then echo "$f"; return 0; fi
    done
    die "no syslinux mbr.bin"
}

do_partition() {
    [ -b "$disk" ] || die "$disk is not a block device"
    [ "$boot_mib" -ge 64 ] || die "OSIMAGE_BOOT_MIB=$boot_mib: FAT32 needs at least 64 MiB"
    say "partitioning $disk: p1 FAT32 $boot_mib MiB (boot), p2 ext4 (payload)"
    printf 'label: dos\nunit: sectors\n\nstart=2048, size=%sMiB, type=c, bootable\ntype=83\n' \
        "$boot_mib" | sfdisk --quiet --wipe always --wipe-partitions always "$disk"
    wait_for "$(part 1)"
    wait_for "$(part 2)"
    mkfs.vfat -F 32 -n "$boot_label" "$(part 1)" >/dev/null
    mkfs.ext4 -q -F -L "$data_label" -m 0 "$(part 2)"
    mkdir -p "$data_dir"
    mount -t ext4 "$(part 2)" "$data_dir"
    say "$(part 2) mounted at $data_dir for the upload"
}

do_boot() {
    media=${OSIMAGE_BOOT_MEDIA:?set OSIMAGE_BOOT_MEDIA to the boot media of the live system}
    [ -d "$media" ] || die "no boot media at $media"
    [ -f "$media/efi/boot/bootx64.efi" ] || [ -f "$media/EFI/BOOT/BOOTX64.EFI" ] \
        || die "$media has no efi/boot/bootx64.efi: the image would not boot under UEFI"
    mkdir -p "$boot_dir"
    mount -t vfat "$(part 1)" "$boot_dir"
    say "copying the boot media $media to $(part 1)"
    # FAT keeps neither owners nor links: copy the files the links point at.
    cp -RL "$media/." "$boot_dir/"
    cfg=$boot_dir/boot/syslinux
    if [ ! -f "$cfg/syslinux.cfg" ] && [ -f "$cfg/isolinux.cfg" ]; then
        cp "$cfg/isolinux.cfg" "$cfg/syslinux.cfg"
    fi
    [ -f "$cfg/syslinux.cfg" ] || die "the boot media has no boot/syslinux/syslinux.cfg"
    rm -f "$cfg/isolinux.bin" "$cfg/boot.cat"
    # What an EFI loader searches for to find this partition.
    printf 'osimage usb-installer %s %s\n' "${OSIMAGE_IMAGE:-}" "${OSIMAGE_VERSION:-}" \
        > "$boot_dir/.osimage-usb"
    sync
    umount "$boot_dir"
    # syslinux (the mtools variant) writes its loader into the unmounted FAT, replacing any
    # ldlinux.c32 of another version the media had.
    syslinux --install --directory /boot/syslinux "$(part 1)"
    dd if="$(mbr_bin)" of="$disk" bs=440 count=1 conv=notrunc 2>/dev/null
    mount -t vfat "$(part 1)" "$boot_dir"
    say "BIOS: syslinux in $(part 1), MBR code in $disk; UEFI: EFI/BOOT/BOOTX64.EFI"
}

do_finish() {
    file=${OSIMAGE_PAYLOAD_FILE:?}
    want=${OSIMAGE_PAYLOAD_SHA256:?}
    size=${OSIMAGE_PAYLOAD_SIZE:?}
    payload=$data_dir/$file
    [ -f "$payload" ] || die "the payload $payload was not uploaded"
    got_size=$(wc -c < "$payload" | tr -d ' ')
    [ "$got_size" = "$size" ] || die "$file: $got_size bytes arrived, the release says $size"
    say "checking the sha256 of $file ($size bytes)"
    got=$(sha256sum "$payload" | cut -d' ' -f1)
    [ "$got" = "$want" ] || die "$file: sha256 $got arrived, the release says $want"
    format=raw
    vsize=$size
    if [ "$(head -c 3 "$payload")" = QFI ]; then
        format=qcow2
        # qcow2 header: the virtual size is the big-endian 64-bit number at byte 24
        vsize=$(printf '%d' "0x$(od -An -tx1 -j24 -N8 "$payload" | tr -d ' \n')")
    fi
    printf '%s  %s\n' "$want" "$file" > "$data_dir/$file.sha256"
    {
        echo "# written by compose.sh: the payload the installer writes, as the release records it"
        echo "PAYLOAD_FILE='$file'"
        echo "PAYLOAD_SHA256='$want'"
        echo "PAYLOAD_SIZE='$size'"
        echo "PAYLOAD_FORMAT='$format'"
        echo "PAYLOAD_VIRTUAL_SIZE='$vsize'"
        echo "PAYLOAD_IMAGE='${OSIMAGE_PAYLOAD_IMAGE:-}'"
        echo "PAYLOAD_VERSION='${OSIMAGE_PAYLOAD_VERSION:-}'"
        echo "PAYLOAD_RELEASE='${OSIMAGE_PAYLOAD_RELEASE:-}'"
        echo "BUILT_BY='${OSIMAGE_IMAGE:-} ${OSIMAGE_VERSION:-} ${OSIMAGE_COMMIT:-}'"
    } > "$data_dir/payload.env"
    [ -f "$data_dir/osimage-install" ] || die "the installer was not uploaded"
    chmod 0755 "$data_dir/osimage-install"
    sync
    if grep -q " $boot_dir " /proc/mounts; then umount "$boot_dir"; fi
    umount "$data_dir"
    say "payload $file ($format, sha256 $want) of ${OSIMAGE_PAYLOAD_IMAGE:-?}" \
        "${OSIMAGE_PAYLOAD_VERSION:-?} (release ${OSIMAGE_PAYLOAD_RELEASE:-?}) is on $(part 2)"
}

case $phase in
    partition) do_partition ;;
    boot) do_boot ;;
    finish) do_finish ;;
    *) die "unknown phase $phase (partition, boot or finish)" ;;
esac
