#!/usr/bin/env bash
# Build the source disk of images/debian-base/: a Debian 12 (bookworm) system with systemd
# and OpenSSH, made from Debian packages with mmdebstrap, bootable under QEMU, byte-for-byte
# reproducible for a given SOURCE_DATE_EPOCH and mirror state.
#
# Usage: scripts/make-debian-base-disk.sh OUTDIR
#   Writes OUTDIR/debian-base.qcow2 and OUTDIR/debian-base.qcow2.sha256 (sha256sum format).
#
# Host packages needed: mmdebstrap, syslinux, syslinux-common, mtools, dosfstools,
# e2fsprogs, fdisk, qemu-utils, tar. Run as root (mmdebstrap's root mode chroots into its
# own temporary tree); the disk itself is made without loop devices or mounts.
#
# Environment (optional):
#   SOURCE_DATE_EPOCH  timestamp of every file and filesystem (default 1700000000)
#   DEBIAN_MIRROR      default http://deb.debian.org/debian
#   OSIMAGE_CACHE      default ~/.cache/osimage; downloaded .debs are kept in
#                      $OSIMAGE_CACHE/debs/<hash of suite, mirror, variant, packages>/
#
# Disk layout (MBR, label-id 0x44454231, 2 GiB virtual):
#   p1  sectors 2048..262143      (127 MiB) FAT16 "DEBBOOT", active: syslinux,
#                                           vmlinuz, initrd.img, syslinux.cfg
#   p2  sectors 262144..4194303   (1.9 GiB) ext4 "debian-root", the root file system
#       => p2 starts at byte 134217728 (= 128 MiB), a fixed constant: read a file with
#          qemu-img convert -O raw DISK disk.raw
#          debugfs -R 'cat /etc/os-release' 'disk.raw?offset=134217728'
#
# The guest:
#   * systemd is PID 1; the kernel command line has console=ttyS0 (serial getty) and
#     net.ifnames=0, so the first NIC is eth0, which ifupdown brings up by DHCP.
#   * root logs in over SSH with a key only. No key is on the disk: at boot
#     osimage-authorized-keys.service copies the QEMU fw_cfg item
#     opt/osimage/authorized_keys (qemu -fw_cfg name=opt/osimage/authorized_keys,file=KEY.pub)
#     to /run/osimage/authorized_keys (a tmpfs, so it never reaches the disk), which sshd
#     reads besides ~/.ssh/authorized_keys.
#   * no SSH host keys are on the disk: osimage-ssh-hostkeys.service makes ed25519 and ecdsa ones before
#     sshd when they are missing (first boot of every copy).
#   * the kernel and initramfs are copies on p1: a kernel upgrade inside the guest does not
#     reach the boot partition (rebuild the base instead).
set -euo pipefail

die() { echo "make-debian-base-disk: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUTDIR=$1

export LC_ALL=C TZ=UTC
umask 022

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export SOURCE_DATE_EPOCH
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
export MTOOLS_SKIP_CHECK=1 MTOOLS_NO_VFAT=1
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE_ROOT=${OSIMAGE_CACHE:-${HOME:-/root}/.cache/osimage}

readonly SUITE=bookworm
readonly VARIANT=minbase
# python3: the later layers are provisioned with Ansible, which needs it on the target.
readonly PACKAGES="systemd-sysv,udev,dbus,kmod,openssh-server,linux-image-cloud-amd64,initramfs-tools,ifupdown,isc-dhcp-client,iproute2,netbase,python3"

# --- fixed layout (sectors of 512 bytes) -------------------------------------
readonly SECTOR=512
readonly P1_START=2048
readonly P1_SIZE=260096          # 127 MiB
readonly P2_START=262144         # 128 MiB => byte offset 134217728
readonly DISK_SECTORS=4194304    # 2 GiB
readonly P2_SIZE=$((DISK_SECTORS - P2_START))
readonly P1_OFFSET=$((P1_START * SECTOR))
readonly P2_OFFSET=$((P2_START * SECTOR))
readonly LABEL_ID=0x44454231     # "DEB1"
readonly VFAT_ID=44454231
readonly ROOT_UUID=6f73696d-6167-4500-8000-64656269616e
readonly HASH_SEED=5a5a5a5a-1234-4321-8765-0123456789ab
readonly FW_CFG_KEYS=/sys/firmware/qemu_fw_cfg/by_name/opt/osimage/authorized_keys/raw
readonly CMDLINE="root=LABEL=debian-root ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 panic=10"

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap root mode)"
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
[ -r "$MBR_BIN" ] || die "missing $MBR_BIN (apt-get install syslinux-common)"
for t in mmdebstrap sfdisk mkfs.vfat mkfs.ext4 debugfs syslinux mcopy qemu-img tar; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/debian-base-disk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- .deb cache, keyed by everything that decides which .debs are fetched -----
cache_key=$(printf '%s\n' "$SUITE" "$VARIANT" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-16)
DEBS=$CACHE_ROOT/debs/$SUITE-$cache_key
INCOMING=$CACHE_ROOT/debs/.incoming  # same file system as $DEBS: a rename moves a file in
mkdir -p "$DEBS" "$INCOMING" "$WORK/debs-out"

# --- customize hook: runs outside the chroot with the tree as $1 --------------
cat >"$WORK/customize.sh" <<EOF
#!/bin/sh
set -eu
root=\$1
printf 'debian-base\n' >"\$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian-base\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"\$root/etc/hosts"
: >"\$root/etc/resolv.conf"
printf 'LABEL=debian-root\t/\text4\tdefaults,errors=remount-ro\t0\t1\n' >"\$root/etc/fstab"
mkdir -p "\$root/etc/network/interfaces.d"
printf 'auto eth0\niface eth0 inet dhcp\n' >"\$root/etc/network/interfaces.d/eth0"

cat >"\$root/etc/ssh/sshd_config.d/osimage.conf" <<'CONF'
# Key-only root login; the build's key comes from fw_cfg into /run (never onto the disk).
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys /run/osimage/authorized_keys
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
CONF

cat >"\$root/usr/local/sbin/osimage-authorized-keys" <<'SCRIPT'
#!/bin/sh
# root's SSH keys handed over by qemu -fw_cfg name=opt/osimage/authorized_keys,file=KEY.pub
modprobe qemu_fw_cfg 2>/dev/null || true
install -d -m 0700 /run/osimage
if [ -r $FW_CFG_KEYS ]; then
    cat $FW_CFG_KEYS >/run/osimage/authorized_keys
    chmod 0600 /run/osimage/authorized_keys
    echo "osimage: authorized_keys from fw_cfg"
fi
SCRIPT
chmod 0755 "\$root/usr/local/sbin/osimage-authorized-keys"

cat >"\$root/etc/systemd/system/osimage-authorized-keys.service" <<'UNIT'
[Unit]
Description=root's SSH keys from QEMU fw_cfg (opt/osimage/authorized_keys)
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/osimage-authorized-keys

[Install]
WantedBy=multi-user.target
UNIT

cat >"\$root/etc/systemd/system/osimage-ssh-hostkeys.service" <<'UNIT'
[Unit]
Description=SSH host keys made on this machine's first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# Not ssh-keygen -A: an RSA key takes half a minute to make under TCG (no KVM).
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N '' -f /etc/ssh/ssh_host_ecdsa_key

[Install]
RequiredBy=ssh.service
UNIT
mkdir -p "\$root/etc/systemd/system/multi-user.target.wants" "\$root/etc/systemd/system/ssh.service.requires"
ln -sf ../osimage-authorized-keys.service "\$root/etc/systemd/system/multi-user.target.wants/"
ln -sf ../osimage-ssh-hostkeys.service "\$root/etc/systemd/system/ssh.service.requires/"

# e2scrub_reap looks for LVM snapshots at every boot: none here, and it costs half a minute
# of CPU under TCG.
ln -sf /dev/null "\$root/etc/systemd/system/e2scrub_reap.service"

# Made by openssh-server's postinst on the build host: every copy makes its own.
rm -f "\$root"/etc/ssh/ssh_host_*
# Caches that hold the build's time or order.
rm -f "\$root/var/cache/ldconfig/aux-cache" "\$root"/var/cache/debconf/*-old "\$root"/var/lib/dpkg/*-old
EOF
chmod 0755 "$WORK/customize.sh"

# --- root tree as a tar --------------------------------------------------------
start=$(date +%s)
mmdebstrap --quiet --variant="$VARIANT" --include="$PACKAGES" \
    --skip=essential/unlink \
    --setup-hook="mkdir -p \"\$1/var/cache/apt/archives/\"" \
    --setup-hook="sync-in '$DEBS' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$WORK/debs-out'" \
    --customize-hook="$WORK/customize.sh" \
    "$SUITE" "$WORK/root.tar" "$MIRROR"
echo "mmdebstrap: $(($(date +%s) - start)) s"
# Into the shared cache one whole .deb at a time (a copy beside it, then a rename): another
# build's sync-in at the same moment sees each file complete or not at all, and two builds
# adding the same .deb (same name, same bytes) both succeed.
for deb in "$WORK"/debs-out/*.deb; do
    [ -e "$deb" ] || continue
    name=${deb##*/}
    [ -e "$DEBS/$name" ] && continue
    tmp=$(mktemp "$INCOMING/$name.XXXXXX")
    if ! { cp "$deb" "$tmp" && chmod 0644 "$tmp" && mv -f "$tmp" "$DEBS/$name"; }; then
        rm -f "$tmp"
        die "cannot add $name to the cache $DEBS"
    fi
done

# --- the tree, then boot files --------------------------------------------------
TREE=$WORK/tree
mkdir "$TREE"
tar -C "$TREE" --numeric-owner -xpf "$WORK/root.tar"
kernel=$(find "$TREE/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sort -V | tail -n 1)
[ -n "$kernel" ] || die "no kernel in the tree"
kver=${kernel#vmlinuz-}
[ -r "$TREE/boot/initrd.img-$kver" ] || die "no initrd.img-$kver in the tree"
cp "$TREE/boot/$kernel" "$WORK/vmlinuz"
cp "$TREE/boot/initrd.img-$kver" "$WORK/initrd.img"
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $CMDLINE
EOF
touch -d "@$SOURCE_DATE_EPOCH" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg"

# --- disk --------------------------------------------------------------------
DISK=$WORK/disk.raw
truncate -s $((DISK_SECTORS * SECTOR)) "$DISK"
sfdisk --quiet --no-reread --no-tell-kernel --wipe never "$DISK" >/dev/null <<EOF
label: dos
label-id: $LABEL_ID
unit: sectors

start=$P1_START, size=$P1_SIZE, type=6, bootable
start=$P2_START, size=$P2_SIZE, type=83
EOF

# p1: FAT16 + syslinux (see make-smoke-disk.sh for --invariant and the warning).
mkfs.vfat --invariant -F 16 -n DEBBOOT -i "$VFAT_ID" -h "$P1_START" \
    --offset "$P1_START" "$DISK" $((P1_SIZE * SECTOR / 1024)) 2>&1 >/dev/null \
    | { grep -v '^Warning: block count mismatch' >&2 || true; }
syslinux --offset "$P1_OFFSET" --install "$DISK"
for f in vmlinuz initrd.img syslinux.cfg; do
    mcopy -m -o -i "$DISK@@$P1_OFFSET" "$WORK/$f" "::/$f"
done

# p2: ext4 from the tree. mke2fs -d copies each host file's atime and ctime, which are the
# time of the extraction (ctime cannot be set), so every inode's times are set afterwards.
mkfs.ext4 -q -F -L debian-root -U "$ROOT_UUID" -b 4096 -d "$TREE" \
    -E "offset=$P2_OFFSET,hash_seed=$HASH_SEED,root_owner=0:0,nodiscard,lazy_itable_init=0" \
    "$DISK" $((P2_SIZE * SECTOR / 1024))k
# Every inode in use but the reserved ones mke2fs made itself (1, 3-10): the free ranges of
# each group from dumpe2fs, inverted.
dumpe2fs "$DISK?offset=$P2_OFFSET" 2>/dev/null | awk -v t="$SOURCE_DATE_EPOCH" '
    /^Inodes per group:/ { ipg = $4 }
    /^Group [0-9]+:/ { g = $2 + 0 }
    /^  Free inodes: / {
        split("", free)
        line = $0; sub(/^  Free inodes: */, "", line)
        n = split(line, parts, ", ")
        for (i = 1; i <= n; i++) {
            m = split(parts[i], r, "-")
            for (j = r[1] + 0; j <= (m == 2 ? r[2] + 0 : r[1] + 0); j++) free[j] = 1
        }
        for (j = g * ipg + 1; j <= (g + 1) * ipg; j++)
            if (!(j in free) && (j == 2 || j >= 11))
                printf "set_inode_field <%d> ctime @%s\nset_inode_field <%d> atime @%s\n", j, t, j, t
    }' >"$WORK/times.debugfs"
[ -s "$WORK/times.debugfs" ] || die "dumpe2fs listed no inodes in use"
debugfs -w -f "$WORK/times.debugfs" "$DISK?offset=$P2_OFFSET" >/dev/null 2>"$WORK/debugfs.err" \
    || { cat "$WORK/debugfs.err" >&2; die "debugfs could not set the inode times"; }

# MBR boot code into the first 440 bytes (keeps the partition table).
dd if="$MBR_BIN" of="$DISK" bs=440 count=1 conv=notrunc status=none

qemu-img convert -f raw -O qcow2 "$DISK" "$WORK/debian-base.qcow2"
sum=$(sha256sum "$WORK/debian-base.qcow2" | cut -d' ' -f1)
mv -f "$WORK/debian-base.qcow2" "$OUTDIR/debian-base.qcow2"
printf '%s  debian-base.qcow2\n' "$sum" >"$OUTDIR/debian-base.qcow2.sha256.tmp"
mv -f "$OUTDIR/debian-base.qcow2.sha256.tmp" "$OUTDIR/debian-base.qcow2.sha256"
echo "debian-base disk: $OUTDIR/debian-base.qcow2"
echo "sha256: $sum"
echo "kernel: $kver"
echo "p2 offset: $P2_OFFSET bytes (sector $P2_START)"
