#!/bin/bash
# Makes the installed node generic, so every node written from the image starts as a new
# machine: no package caches, no machine identity, no SSH host keys, no logs, no trace of the
# build. Runs last; its last act removes the build's key from root's authorized_keys (Packer's
# SSH connection stays open, so the build still shuts the VM down cleanly).
set -euo pipefail

# package caches (repodata and downloaded RPMs)
dnf clean all --quiet
rm -rf /var/cache/dnf/*

# identity: systemd makes a new machine-id on first boot when the file is empty, and
# sshd-keygen makes new host keys when there are none
truncate -s 0 /etc/machine-id
rm -f /var/lib/systemd/random-seed
rm -f /etc/ssh/ssh_host_*

# network: the connection profiles and leases of the build VM's NIC (NetworkManager brings every
# NIC up with DHCP by itself)
# (EL9 writes keyfiles; an ifcfg file is there only when something wrote one)
if [ -d /etc/sysconfig/network-scripts ]; then
    find /etc/sysconfig/network-scripts -name 'ifcfg-*' ! -name 'ifcfg-lo' -delete
fi
rm -rf /etc/NetworkManager/system-connections/* /var/lib/NetworkManager/*

# the installer's records (they hold the build's kickstart, with the build's public key) and
# the build's temporary files; overwritten first, so the disk's free blocks do not keep them
find /var/log/anaconda /root/anaconda-ks.cfg /root/original-ks.cfg /root/ks-post.log \
    -type f -exec shred --zero --iterations=0 --remove {} + 2>/dev/null || true
rm -rf /var/log/anaconda /root/anaconda-ks.cfg /root/original-ks.cfg /root/ks-post.log
rm -rf /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]*

# logs: the journal and rotated logs go, the files syslog writes to stay (empty)
rm -rf /var/log/journal/*
find /var/log -type f \( -name '*.gz' -o -name '*-[0-9]*' -o -name '*.old' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history
unset HISTFILE

# last: the build's key, overwritten in place before the file is emptied (as above). Nothing
# but an authorized key of the site lets root in afterwards. (A layer's build, alma9-compute,
# got its key in /run/osimage, a tmpfs, and finds the file empty already.)
if [ -f /root/.ssh/authorized_keys ]; then
    shred --zero --iterations=0 /root/.ssh/authorized_keys
fi
: > /root/.ssh/authorized_keys
sync
echo "cleanup: generic image; root's authorized_keys is empty"
