#!/bin/sh
# What this build's boot made that must not ship: each copy makes its own host keys and
# machine id at its first boot (osimage-ssh-hostkeys.service, systemd).
set -eu
rm -f /etc/ssh/ssh_host_*
printf 'uninitialized\n' >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
rm -rf /var/log/journal/* /var/lib/dhcp/*
apt-get clean
sync
