#!/bin/sh
# Alpine live system of the build: the online repositories of the running release (the ISO's
# own apks/ hold only what the ISO needs) and the tools compose.sh and overlay.sh run.
set -eu
mirror=${OSIMAGE_ALPINE_MIRROR:-https://dl-cdn.alpinelinux.org/alpine}
release=v$(cut -d. -f1,2 /etc/alpine-release)
printf '%s/%s/main\n%s/%s/community\n' "$mirror" "$release" "$mirror" "$release" \
    >> /etc/apk/repositories
apk update --quiet
apk add --quiet sfdisk dosfstools e2fsprogs mtools syslinux grub grub-efi
echo "tools: Alpine $(cat /etc/alpine-release), repositories $mirror/$release"
