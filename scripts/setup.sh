#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for osimage: the tools a build runs (packer, qemu,
# the smoke disk's ingredients), the servers the tests start (sshd, libvirtd, registry), and
# the Python package with its dependencies. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    git packer qemu-system-x86 qemu-utils openssh-client openssh-server rsync
    # the smoke image's source disk (scripts/make-smoke-disk.sh)
    linux-image-cloud-amd64 busybox-static dropbear-bin syslinux syslinux-common mtools
    dosfstools e2fsprogs fdisk cpio gzip xz-utils zstd
    # libvirt NAT networks with DHCP (the native libvirt driver's tests, in a network namespace)
    dnsmasq-base iptables iproute2 util-linux
    # libvirt backend (the Python binding builds from source against it; the plugin makes
    # its OEMDRV kickstart CD with xorriso on the machine that runs Packer)
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc xorriso
    # patch tarball tests: a real dnf repository (rpmbuild, createrepo_c) checked on the host;
    # every archive the check accepts lists alike under GNU tar, bsdtar and busybox tar
    createrepo-c rpm libarchive-tools
    # rocky8-base's playbooks (ansible-playbook); usb-installer: the tests' live ISO (isolinux),
    # the stick's UEFI loader (grub-mkstandalone) and UEFI boots of the stick (ovmf)
    ansible isolinux syslinux-utils grub-efi-amd64-bin grub-common ovmf
    # diskless exports (osimage/features/exports.py): squashfs without root, OCI image, push, test registry
    squashfs-tools squashfs-tools-ng umoci skopeo docker-registry
    # images/debian-base: its source disk (scripts/make-debian-base-disk.sh)
    mmdebstrap
    # checking what we ship
    shellcheck
    # --debug: the serial console command it prints (socat -,raw,echo=0 UNIX-CONNECT:...)
    socat
    # release sign/verify (gpg) and the release page's test in a headless browser
    gnupg chromium
    # libvirt driver native: installer ISOs (virt-install --location, --initrd-inject)
    virtinst
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test,libvirt,s3]'
echo "setup: done"
