#!/usr/bin/env bash
# Build the source disk of images/smoke/: a tiny, bootable, byte-for-byte
# reproducible Linux disk made only from Debian packages already on the host.
#
# Usage: scripts/make-smoke-disk.sh OUTDIR [PUBKEY_FILE]
#   Writes OUTDIR/smoke.qcow2 and OUTDIR/smoke.qcow2.sha256 (sha256sum format)
#   and prints the sha256 and the p2 byte offset.
#   PUBKEY_FILE is an OpenSSH public key (e.g. the build's temporary ed25519
#   key's .pub) baked into root's authorized_keys. Without it the disk holds no
#   key (and does not change from build to build): the guest then takes root's
#   keys at boot from the QEMU fw_cfg item opt/osimage/authorized_keys, i.e.
#     qemu ... -fw_cfg name=opt/osimage/authorized_keys,file=KEY.pub
#   (both sources are used when both are present).
#
# Host packages needed: linux-image-cloud-amd64, busybox-static, dropbear-bin,
# openssh-client (scp), syslinux, syslinux-common, mtools, dosfstools,
# e2fsprogs, fdisk, cpio, qemu-utils, gzip.
# No root, loop devices or mounts are needed.
#
# Environment (optional):
#   SOURCE_DATE_EPOCH  timestamp of every file and filesystem (default 1700000000)
#   KERNEL_VERSION     e.g. 6.1.0-56-cloud-amd64 (default: newest /boot/vmlinuz-*-cloud-amd64)
#   SMOKE_EXTRA_DEBS   .deb files (space separated) unpacked into the initramfs too
#
# The Debian packages the disk is made from (those owning the files it holds, and the extra
# .debs) are listed in the initramfs at /usr/share/osimage/packages, in the format of
# osimage/features/packages_list.sh, which prints it in the guest: the build's package list.
#
# Disk layout (MBR, label-id 0x534d4b31, 128 MiB virtual):
#   p1  sectors 2048..131071     (63 MiB)  FAT16 "SMOKEBOOT", active: syslinux,
#                                          vmlinuz, initrd.gz, syslinux.cfg
#   p2  sectors 131072..262143   (64 MiB)  ext4 "smoke-data", NO journal
#       => p2 starts at byte 67108864 (= 64 MiB), a fixed constant.
#
# Inside the guest (all of it runs from the initramfs, root fs is a ramfs):
#   * the data partition p2 (/dev/vda2, found by label smoke-data) is mounted
#     at /data; a provisioner that writes /data/marker can be read back
#     from the artifact with
#        qemu-img convert -O raw ARTIFACT disk.raw
#        debugfs -R 'cat /marker' 'disk.raw?offset=67108864'
#   * eth0 gets its address by DHCP (udhcpc), dropbear listens on port 22,
#     root logs in with the key(s) from PUBKEY_FILE and/or fw_cfg only (no
#     password); scp and /bin/sh exist,
#     /tmp is writable (Packer 1.6.6 uploads scripts with scp to /tmp).
#   * `poweroff` (busybox, PID 1 is busybox init) kills all processes, syncs,
#     unmounts /data (or remounts it read-only) and powers the VM off. The
#     ext4 has no journal, so whatever was synced is in place on disk.
#     `sync; umount /data; poweroff -f` also works. /sbin/poweroff, /sbin/reboot
#     and /sbin/halt called by their path (not as busybox sh's own applets) do
#     the same about 2 s sooner: /etc/rc.shutdown then does the last step itself.
set -euo pipefail

die() { echo "make-smoke-disk: $*" >&2; exit 1; }

[ $# -eq 1 ] || [ $# -eq 2 ] || die "usage: $0 OUTDIR [PUBKEY_FILE]"
OUTDIR=$1
PUBKEY_FILE=${2:-}
if [ -n "$PUBKEY_FILE" ] && [ ! -r "$PUBKEY_FILE" ]; then
    die "cannot read public key file: $PUBKEY_FILE"
fi

export LC_ALL=C TZ=UTC
umask 022

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export SOURCE_DATE_EPOCH
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
export MTOOLS_SKIP_CHECK=1 MTOOLS_NO_VFAT=1

# --- fixed layout (sectors of 512 bytes) -------------------------------------
readonly SECTOR=512
readonly P1_START=2048
readonly P1_SIZE=129024          # 63 MiB
readonly P2_START=131072         # 64 MiB => byte offset 67108864
readonly P2_SIZE=131072          # 64 MiB
readonly DISK_SECTORS=$((P2_START + P2_SIZE))
readonly P1_OFFSET=$((P1_START * SECTOR))
readonly P2_OFFSET=$((P2_START * SECTOR))
readonly LABEL_ID=0x534d4b31     # "SMK1"
readonly VFAT_ID=534D4B31
readonly HASH_SEED=5a5a5a5a-1234-4321-8765-0123456789ab
# Modules the cloud kernel has as modules, loaded in this order (qemu_fw_cfg:
# /sys/firmware/qemu_fw_cfg, for the authorized_keys handed over by fw_cfg).
readonly MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net qemu_fw_cfg"
readonly FW_CFG_KEYS=/sys/firmware/qemu_fw_cfg/by_name/opt/osimage/authorized_keys/raw

# --- locate inputs -----------------------------------------------------------
if [ -z "${KERNEL_VERSION:-}" ]; then
    KERNEL_VERSION=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' -printf '%f\n' \
        | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
fi
[ -n "$KERNEL_VERSION" ] || die "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)"
KERNEL=/boot/vmlinuz-$KERNEL_VERSION
MODDIR=/lib/modules/$KERNEL_VERSION
[ -r "$KERNEL" ] || die "cannot read $KERNEL"
[ -d "$MODDIR" ] || die "no $MODDIR"

BUSYBOX=/bin/busybox
DROPBEAR=/usr/sbin/dropbear
SCP=/usr/bin/scp
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
for f in "$BUSYBOX" "$DROPBEAR" "$SCP" "$MBR_BIN"; do
    [ -r "$f" ] || die "missing $f"
done
for t in sfdisk mkfs.vfat mkfs.ext4 syslinux mcopy cpio gzip qemu-img ldd; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done
"$BUSYBOX" --list-full >/dev/null 2>&1 || die "$BUSYBOX has no --list-full (install busybox-static)"

mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/smoke-disk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/initramfs
mkdir -p "$ROOT"

# --- initramfs tree ----------------------------------------------------------
for d in bin sbin usr/bin usr/sbin etc etc/dropbear dev proc sys tmp run root root/.ssh \
         data lib/modules var/log; do
    mkdir -p "$ROOT/$d"
done
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root" "$ROOT/root/.ssh" "$ROOT/etc/dropbear"

install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
# Applet links, relative so they also work when the tree is inspected on the host.
while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    if [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ]; then continue; fi
    mkdir -p "$ROOT/$(dirname "$applet")"
    case $applet in
        */*/*) ln -s ../../bin/busybox "$ROOT/$applet" ;;
        *) ln -s ../bin/busybox "$ROOT/$applet" ;;
    esac
done < <("$BUSYBOX" --list-full | sort)

# dropbear + scp and the shared libraries ldd lists (copied to the same paths).
install -m 0755 "$DROPBEAR" "$ROOT/usr/sbin/dropbear"
install -m 0755 "$SCP" "$ROOT/usr/bin/scp"
ldd "$DROPBEAR" "$SCP" \
    | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' \
    | sort -u \
    | while read -r lib; do
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
        chmod 0755 "$ROOT$lib"
    done

# kernel modules (decompressed if the kernel ships them compressed)
for m in $MODULES; do
    src=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
    [ -n "$src" ] || die "module $m not found under $MODDIR"
    case $src in
        *.ko) cp "$src" "$ROOT/lib/modules/$m.ko" ;;
        *.xz) xz -dc "$src" >"$ROOT/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" >"$ROOT/lib/modules/$m.ko" ;;
        *.gz) gzip -dc "$src" >"$ROOT/lib/modules/$m.ko" ;;
    esac
    chmod 0644 "$ROOT/lib/modules/$m.ko"
done

# Extra packages, unpacked as dpkg would (no maintainer scripts).
for deb in ${SMOKE_EXTRA_DEBS:-}; do
    [ -r "$deb" ] || die "cannot read $deb (SMOKE_EXTRA_DEBS)"
    dpkg-deb -x "$deb" "$ROOT"
done

# The package record: which Debian package owns each file taken from the host.
owners() {
    local f
    for f in "$@"; do
        { dpkg-query -S "$f" 2>/dev/null || dpkg-query -S "$(readlink -f "$f")" 2>/dev/null \
            || die "no Debian package owns $f"; } | grep -v '^diversion ' | head -n 1 | cut -d: -f1
    done
}
TAB=$(printf '\t')
mkdir -p "$ROOT/usr/share/osimage"
{
    printf 'os debian %s\nmanager dpkg\n' "$(. /etc/os-release && echo "${VERSION_ID:-}")"
    # shellcheck disable=SC2046
    pkgs=$(owners "$BUSYBOX" "$DROPBEAR" "$SCP" "$MBR_BIN" "$(command -v syslinux)" "$KERNEL" \
        $(ldd "$DROPBEAR" "$SCP" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}') \
        | sort -u)
    # shellcheck disable=SC2086
    dpkg-query -W -f "P$TAB\${db:Status-Abbrev}$TAB\${Package}$TAB\${Version}$TAB\${Architecture}$TAB\${source:Package}$TAB\${source:Version}\n" $pkgs
    copyrights=""
    for p in $pkgs; do copyrights="$copyrights /usr/share/doc/$p/copyright"; done
    for deb in ${SMOKE_EXTRA_DEBS:-}; do
        # a .deb's Source field is "NAME" or "NAME (VERSION)"; empty when it is the package
        dpkg-deb -W --showformat "P${TAB}ii ${TAB}\${Package}$TAB\${Version}$TAB\${Architecture}$TAB\${Source}\n" "$deb" \
            | awk -F "$TAB" -v OFS="$TAB" '{ split($6, s, " "); src = s[1] == "" ? $3 : s[1]
                  ver = s[2] == "" ? $4 : substr(s[2], 2, length(s[2]) - 2); $6 = src
                  print $0, ver }'
        copyrights="$copyrights $ROOT/usr/share/doc/$(dpkg-deb -f "$deb" Package)/copyright"
    done
    # shellcheck disable=SC2086
    for c in $copyrights; do [ -r "$c" ] && echo "$c"; done | sort | while read -r c; do
        head -n 1 "$c" | grep -q '^Format:' || continue
        pkg=$(basename "$(dirname "$c")")
        sed -n 's/^License:[ \t]*\(.*[^ \t]\)[ \t]*$/\1/p' "$c" | awk '!seen[$0]++' \
            | while read -r l; do printf 'L\t%s\t%s\n' "$pkg" "$l"; done
    done
} >"$ROOT/usr/share/osimage/packages"

# users, ssh key
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$ROOT/etc/shadow"
chmod 0600 "$ROOT/etc/shadow"
printf '/bin/sh\n' >"$ROOT/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$ROOT/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"
printf 'smoke\n' >"$ROOT/etc/hostname"
: >"$ROOT/root/.ssh/authorized_keys"
if [ -n "$PUBKEY_FILE" ]; then
    grep -E '^(ssh-|ecdsa-|sk-)' "$PUBKEY_FILE" >"$ROOT/root/.ssh/authorized_keys" \
        || die "$PUBKEY_FILE holds no OpenSSH public key"
fi
chmod 0600 "$ROOT/root/.ssh/authorized_keys"
printf 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n' >"$ROOT/etc/profile"

# udhcpc hook: set the address and the default route.
cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do
            ip route add default via "$r" dev "$interface" && break
        done
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        ;;
esac
exit 0
EOF
chmod 0755 "$ROOT/etc/udhcpc.script"

# /init: PID 1 until it execs busybox init.
cat >"$ROOT/init" <<EOF
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
hostname -F /etc/hostname
# A blocking read of /dev/random makes the kernel gather jitter entropy now, while the
# modules load and DHCP runs; dropbear only polls /dev/random, which under TCG left it
# waiting more than a second for the crng after everything else was ready.
dd if=/dev/random of=/dev/null bs=1 count=1 2>/dev/null &
for m in $MODULES; do
    insmod /lib/modules/\$m.ko || echo "smoke: insmod \$m failed"
done
# root's keys handed over by qemu -fw_cfg name=opt/osimage/authorized_keys,file=KEY.pub
if [ -r $FW_CFG_KEYS ]; then
    cat $FW_CFG_KEYS >>/root/.ssh/authorized_keys
    echo >>/root/.ssh/authorized_keys
    echo "smoke: authorized_keys from fw_cfg"
fi
# The data partition (p2, ext4, label smoke-data) is mounted at /data.
i=0
while :; do
    dev=\$(findfs LABEL=smoke-data 2>/dev/null) && break
    i=\$((i + 1))
    [ \$i -ge 100 ] && break
    sleep 0.1
done
if [ -n "\$dev" ] && mount -t ext4 -o rw "\$dev" /data; then
    echo "smoke: \$dev mounted at /data"
else
    echo "smoke: data partition NOT mounted"
fi
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
# dropbear listens before eth0 has its address: a connection that reaches the guest finds
# it (a refused one costs Packer a 5 s retry; one that cannot reach it, qemu's user network
# resends seconds later).
dropbear -R -E -p 22
udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 1 || echo "smoke: DHCP failed"
echo "smoke: ready"
exec /sbin/init
EOF
chmod 0755 "$ROOT/init"

cat >"$ROOT/etc/inittab" <<'EOF'
::shutdown:/etc/rc.shutdown
ttyS0::askfirst:-/bin/sh
::ctrlaltdel:/sbin/reboot
EOF

# /sbin/poweroff, reboot and halt record what was asked for, then ask busybox init as before
# (busybox sh runs its own applet for a bare `poweroff`: that takes the slower path).
for action in poweroff reboot halt; do
    rm -f "$ROOT/sbin/$action"
    printf '#!/bin/sh\necho %s >/run/shutdown-action\nexec /bin/busybox %s "$@"\n' \
        "$action" "$action" >"$ROOT/sbin/$action"
    chmod 0755 "$ROOT/sbin/$action"
done

# Run by busybox init on poweroff/reboot before it kills everything itself. Once /data is
# clean it does what was asked itself: busybox init would sleep 2 s more (after its SIGTERM,
# and before the reboot call) with nothing left to stop.
cat >"$ROOT/etc/rc.shutdown" <<'EOF'
#!/bin/sh
kill -TERM -1 2>/dev/null
# up to 1 s for the processes to go (kernel threads and zombies have no exe)
i=0
while [ $i -lt 20 ]; do
    left=0
    for d in /proc/[0-9]*; do
        [ "$d" = /proc/1 ] || [ "$d" = /proc/$$ ] || [ ! -e "$d/exe" ] || left=1
    done
    [ $left = 0 ] && break
    sleep 0.05
    i=$((i + 1))
done
kill -KILL -1 2>/dev/null
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
sync
echo "smoke: /data unmounted, powering off"
action=$(cat /run/shutdown-action 2>/dev/null)
case $action in
    poweroff|reboot|halt) exec /bin/busybox "$action" -f ;;
esac
EOF
chmod 0755 "$ROOT/etc/rc.shutdown"

find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$ROOT" && find . | sort | cpio --quiet --reproducible -o -H newc -R 0:0) \
    | gzip -n -9 >"$WORK/initrd.gz"

# --- boot files --------------------------------------------------------------
# Under TCG the kernel's boot is most of a smoke build's wait for SSH: mitigations=off (no
# retpolines and such to patch in and run), no crypto self-tests, and two slow initcalls the
# guest never uses (the KDF's self-test, kprobe tracing) take about half a second off it.
cat >"$WORK/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT smoke
PROMPT 0
TIMEOUT 0
LABEL smoke
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND console=tty0 console=ttyS0,115200n8 panic=10 quiet mitigations=off cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace
EOF
cp "$KERNEL" "$WORK/vmlinuz"
touch -d "@$SOURCE_DATE_EPOCH" "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/syslinux.cfg"

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

# p1: FAT16 + syslinux
# (--invariant must come before -i, or it resets the volume ID to 1234-ABCD;
# mkfs.vfat warns "block count mismatch" because of --offset: expected.)
mkfs.vfat --invariant -F 16 -n SMOKEBOOT -i "$VFAT_ID" -h "$P1_START" \
    --offset "$P1_START" "$DISK" $((P1_SIZE * SECTOR / 1024)) 2>&1 >/dev/null \
    | { grep -v '^Warning: block count mismatch' >&2 || true; }
syslinux --offset "$P1_OFFSET" --install "$DISK"
for f in vmlinuz initrd.gz syslinux.cfg; do
    mcopy -m -o -i "$DISK@@$P1_OFFSET" "$WORK/$f" "::/$f"
done

# p2: ext4 without journal, fixed UUID (null) and hash seed, no -d.
mkfs.ext4 -q -F -L smoke-data -U clear -m 0 -b 4096 -O ^has_journal \
    -E "offset=$P2_OFFSET,hash_seed=$HASH_SEED,root_owner=0:0,nodiscard,lazy_itable_init=0" \
    "$DISK" $((P2_SIZE * SECTOR / 1024))k

# MBR boot code into the first 440 bytes (keeps the partition table).
dd if="$MBR_BIN" of="$DISK" bs=440 count=1 conv=notrunc status=none

qemu-img convert -f raw -O qcow2 "$DISK" "$WORK/smoke.qcow2"
sum=$(sha256sum "$WORK/smoke.qcow2" | cut -d' ' -f1)
mv -f "$WORK/smoke.qcow2" "$OUTDIR/smoke.qcow2"
printf '%s  smoke.qcow2\n' "$sum" >"$OUTDIR/smoke.qcow2.sha256.tmp"
mv -f "$OUTDIR/smoke.qcow2.sha256.tmp" "$OUTDIR/smoke.qcow2.sha256"
echo "smoke disk: $OUTDIR/smoke.qcow2"
echo "sha256: $sum"
echo "kernel: $KERNEL_VERSION"
echo "p2 offset: $P2_OFFSET bytes (sector $P2_START); data partition is mounted at /data in the guest"
