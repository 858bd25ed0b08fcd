#!/bin/sh
# Makes the compute layer generic, as debian-base's cleanup does for the base: every node made
# from the image starts as a new machine. No package caches or lists (apt-get update fetches
# them again), no machine identity or SSH host keys (made at each copy's first boot), no logs,
# and no munge key: munge's postinst made one for this build VM, and a cluster's nodes must
# share the site's key (a Warewulf overlay or the site's configuration puts it there).
set -eu
apt-get clean
rm -rf /var/lib/apt/lists/*
rm -f /etc/munge/munge.key
rm -f /etc/ssh/ssh_host_*
printf 'uninitialized\n' >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
rm -rf /var/lib/dhcp/* /tmp/* /var/tmp/*
# logs: the journal and rotated logs go, the files daemons write to stay (empty)
rm -rf /var/log/journal/*
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history
sync
echo "cleanup: generic image (no apt lists, machine-id, host keys, munge key or logs)"
