#!/bin/bash
# Applies a security-patch tarball to Rocky 8: runs FIRST in a `./build.py rocky8-base --release X`
# build, so the image's own steps see a patched system. The file it gets is the host's re-pack
# (a plain tar) of the checked members of the release's tarball (made by patches/create.sh,
# checked on the host: sha256, a safe archive, repodata matching its RPMs): RPMs,
# their createrepo_c metadata and advisories.txt. It becomes a local dnf repository and the
# system is updated from that repository only: no other repository is read, nothing is fetched
# from the network, and every package must carry Rocky's signature.
#
# Environment (set by osimage): OSIMAGE_PATCHES (the tarball in the VM), OSIMAGE_PATCHES_NAME,
# OSIMAGE_PATCHES_SHA256 (the release's tarball), OSIMAGE_PATCHES_REPACK_SHA256 (the file here).
set -euo pipefail

tarball=${OSIMAGE_PATCHES:?}
name=${OSIMAGE_PATCHES_NAME:?}
sha256=${OSIMAGE_PATCHES_SHA256:?}
repack_sha256=${OSIMAGE_PATCHES_REPACK_SHA256:?}
repo_id=osimage-patches
repo_dir=/var/lib/osimage/patches/${name%%.tar*}
repo_file=/etc/yum.repos.d/$repo_id.repo
# The keys the system already trusts (Rocky's; EPEL's when the image enabled EPEL).
gpg_keys=$(find /etc/pki/rpm-gpg -maxdepth 1 -type f -name 'RPM-GPG-KEY-*' -printf 'file://%p ')

# The host checked these bytes; check that the upload delivered the same ones.
echo "$repack_sha256  $tarball" | sha256sum --check --strict -

rm -rf "$repo_dir"
install -d -m 0755 "$repo_dir"
tar --extract --file "$tarball" --directory "$repo_dir" \
    --no-same-owner --no-same-permissions --no-overwrite-dir
if [ ! -f "$repo_dir/repodata/repomd.xml" ] || [ ! -f "$repo_dir/advisories.txt" ]; then
    echo "apply.sh: $name is not a patch repository (no repodata/repomd.xml or advisories.txt)" >&2
    exit 1
fi

if [ -z "$gpg_keys" ]; then
    echo "apply.sh: no RPM-GPG-KEY-* in /etc/pki/rpm-gpg: cannot check the packages' signatures" >&2
    exit 1
fi
cat > "$repo_file" <<REPO
[$repo_id]
name=osimage security patches $name
baseurl=file://$repo_dir
enabled=0
gpgcheck=1
repo_gpgcheck=0
gpgkey=$gpg_keys
REPO

only_patches=(--disablerepo='*' --enablerepo="$repo_id" --setopt=install_weak_deps=False)
dnf --assumeyes "${only_patches[@]}" upgrade
# Everything the repository updates is now installed: check-update exits 100 otherwise.
dnf --quiet "${only_patches[@]}" check-update

install -d -m 0755 /etc/osimage
{
    printf 'name=%s\nsha256=%s\nrepacked_sha256=%s\nadvisories:\n' "$name" "$sha256" \
        "$repack_sha256"
    cat "$repo_dir/advisories.txt"
} > /etc/osimage/patches-applied

# The RPMs are installed; the image does not need to carry them.
rm -f "$repo_file" "$tarball"
rm -rf "$repo_dir"
dnf clean all --quiet
echo "apply.sh: applied $name ($(grep -c . /etc/osimage/patches-applied) lines in /etc/osimage/patches-applied)"
