#!/bin/sh
# The Alpine side of the stick, after compose.sh boot (p1 mounted at /mnt/osimage-boot, the
# payload partition at OSIMAGE_PAYLOAD_DIR):
#   - boot configurations for BIOS (syslinux) and UEFI (grub) with the serial console, and a
#     UEFI loader that finds p1 by /.osimage-usb (the ISO's own searches for the ISO's label)
#   - an apkovl, Alpine's overlay for a diskless boot: the stick's hostname and services, a
#     message at login, and a boot hook that mounts the payload partition and, given
#     osimage.target=DISK on the kernel command line, installs unattended
#   - qemu-img and its dependencies as apks on the payload partition: the installer adds them
#     offline when it writes a qcow2 payload
set -eu
boot=/mnt/osimage-boot
data=${OSIMAGE_PAYLOAD_DIR:-/mnt/osimage-payload}
grep -q " $boot " /proc/mounts || { echo "overlay: $boot is not mounted" >&2; exit 1; }

kernel=$(find "$boot/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | head -n 1)
[ -n "$kernel" ] || { echo "overlay: no boot/vmlinuz-* on the boot media" >&2; exit 1; }
flavor=${kernel##*/vmlinuz-}
cmdline="modules=loop,squashfs,sd-mod,usb-storage,nvme modloop=/boot/modloop-$flavor quiet console=tty0 console=ttyS0,115200n8"

cat > "$boot/boot/syslinux/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT osimage
PROMPT 1
TIMEOUT 30
LABEL osimage
  MENU LABEL osimage usb-installer (Alpine Linux $flavor)
  LINUX /boot/vmlinuz-$flavor
  INITRD /boot/initramfs-$flavor
  APPEND $cmdline
CFG

mkdir -p "$boot/boot/grub" "$boot/efi/boot"
cat > "$boot/boot/grub/grub.cfg" <<CFG
serial --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=3
menuentry "osimage usb-installer (Alpine Linux $flavor)" {
    linux /boot/vmlinuz-$flavor $cmdline
    initrd /boot/initramfs-$flavor
}
CFG
early=$(mktemp)
cat > "$early" <<'CFG'
search --no-floppy --file /.osimage-usb --set=root
configfile ($root)/boot/grub/grub.cfg
CFG
grub-mkstandalone --format=x86_64-efi --output="$boot/efi/boot/bootx64.efi" \
    --locales="" --fonts="" --themes="" \
    --install-modules="normal configfile search search_fs_file part_msdos part_gpt fat linux echo serial terminal" \
    --modules="part_msdos part_gpt fat search search_fs_file configfile" \
    "boot/grub/grub.cfg=$early"
rm -f "$early"

# The apkovl: files laid over the live system's / at boot.
ovl=$(mktemp -d)
mkdir -p "$ovl/etc/apk" "$ovl/etc/local.d" "$ovl/etc/runlevels/sysinit" "$ovl/etc/runlevels/boot" \
    "$ovl/etc/runlevels/default" "$ovl/etc/runlevels/shutdown"
echo osimage-installer > "$ovl/etc/hostname"
echo alpine-base > "$ovl/etc/apk/world"
sed 's/^#\(ttyS0::respawn\)/\1/' /etc/inittab > "$ovl/etc/inittab"
for s in devfs dmesg mdev hwdrivers modloop; do ln -s "/etc/init.d/$s" "$ovl/etc/runlevels/sysinit/$s"; done
for s in hwclock modules sysctl hostname bootmisc syslog; do ln -s "/etc/init.d/$s" "$ovl/etc/runlevels/boot/$s"; done
for s in mount-ro killprocs savecache; do ln -s "/etc/init.d/$s" "$ovl/etc/runlevels/shutdown/$s"; done
ln -s /etc/init.d/local "$ovl/etc/runlevels/default/local"
cat > "$ovl/etc/local.d/osimage-install.start" <<'HOOK'
#!/bin/sh
# osimage usb-installer: mount the payload partition; install unattended when the kernel
# command line says osimage.target=DISK (then osimage.poweroff or osimage.reboot act on success).
data=/media/osimage-data
mkdir -p "$data"
dev=$(findfs LABEL=osimage-data 2>/dev/null) && mount -t ext4 -o ro "$dev" "$data" || {
    echo "osimage: the stick's payload partition (LABEL=osimage-data) is missing" > /dev/console
    exit 0
}
read -r cmdline < /proc/cmdline
case " $cmdline " in
    *" osimage.target="*)
        if "$data/osimage-install" --cmdline > /dev/console 2>&1; then
            case " $cmdline " in
                *" osimage.poweroff "*) poweroff ;;
                *" osimage.reboot "*) reboot ;;
            esac
        fi
        ;;
esac
HOOK
chmod 0755 "$ovl/etc/local.d/osimage-install.start"
payload_name=$(basename "${OSIMAGE_PAYLOAD_FILE:-payload}")
cat > "$ovl/etc/motd" <<MOTD

osimage usb-installer: ${OSIMAGE_PAYLOAD_IMAGE:-?} ${OSIMAGE_PAYLOAD_VERSION:-?} of release ${OSIMAGE_PAYLOAD_RELEASE:-?} ($payload_name)

  /media/osimage-data/osimage-install --list          the disks it can write to
  /media/osimage-data/osimage-install --target DISK   write it to DISK and verify it

MOTD
tar -czf "$boot/osimage.apkovl.tar.gz" -C "$ovl" etc  # root owns every file: we run as root
rm -rf "$ovl"

mkdir -p "$data/apks"
apk fetch --quiet --recursive --output "$data/apks" qemu-img
echo "overlay: $flavor kernel, BIOS and UEFI boot configurations, apkovl, $(find "$data/apks" -name '*.apk' | wc -l) apks for qemu-img"
