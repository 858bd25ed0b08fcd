#!/bin/bash
# The provisioned root tree as a tar, for the diskless exports (osimage/features/exports.py: Warewulf 4
# and OpenCHAMI). Runs last in the VM, after cleanup.sh; Packer downloads $OSIMAGE_ROOTFS_OUTPUT.
# First the initramfs is made able to boot diskless (dracut's dmsquash-live + livenet:
# root=live:http://.../IMAGE.squashfs), not host-only, so the same file also boots the disk.
# The tar keeps SELinux labels and security./user. xattrs, no ACLs (tar2sqfs refuses them); it leaves out the pseudo filesystems' content
# (their mount points stay), /boot/efi, caches, temporary files, the machine's identity
# (machine-id, SSH host keys), root's authorized_keys (cleanup.sh emptied it of the build's key;
# a site adds its own) and itself. It is reproducible: names sorted, file times clamped to
# $SOURCE_DATE_EPOCH (the commit's time), no atime/ctime and no PID in the pax headers.
set -euo pipefail

out=${OSIMAGE_ROOTFS_OUTPUT:?}
epoch=${SOURCE_DATE_EPOCH:?}
case $out in
    /var/tmp/* | /tmp/*) ;;
    *) echo "rootfs.sh: $out must be under /var/tmp or /tmp (left out of the tar)" >&2; exit 1 ;;
esac

kver=$(rpm -q --qf '%{VERSION}-%{RELEASE}.%{ARCH}\n' kernel-core | sort -V | tail -n 1)
if [ ! -d /usr/lib/dracut/modules.d/90dmsquash-live ]; then
    dnf -y -q install dracut-live dracut-network
    dnf clean all --quiet
    rm -rf /var/cache/dnf/*
fi
dracut --force --quiet --no-hostonly --add "dmsquash-live livenet" \
    "/boot/initramfs-$kver.img" "$kver"
# dracut leaves a machine-id behind when it had to make one: the image stays generic
truncate -s 0 /etc/machine-id

mkdir -p "$(dirname "$out")"
rm -f "$out"
sync
tar --create --file "$out" --directory / --numeric-owner --sparse \
    --xattrs --xattrs-include='security.*' --xattrs-include='user.*' --selinux \
    --sort=name --mtime="@$epoch" --clamp-mtime --format=posix \
    --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' \
    --exclude="./${out#/}" \
    --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' --exclude='./run/*' \
    --exclude='./tmp/*' --exclude='./var/tmp/*' --exclude='./boot/efi/*' \
    --exclude='./var/cache/dnf/*' --exclude='./var/cache/yum/*' \
    --exclude='./etc/machine-id' --exclude='./etc/ssh/ssh_host_*' \
    --exclude='./root/.ssh/authorized_keys' \
    --exclude='./var/lib/systemd/random-seed' --exclude='./lost+found' \
    .
echo "rootfs.sh: $(stat -c %s "$out") bytes in $out (kernel $kver)"
