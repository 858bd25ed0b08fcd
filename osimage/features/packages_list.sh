#!/bin/sh
# The image's installed packages, from the package manager's own database, into
# $OSIMAGE_PACKAGES_OUTPUT; run in the VM after every other provisioner (osimage/features/
# packages.py reads it). POSIX sh: the smoke image has only busybox.
#
#   osimage-packages 1
#   os ID VERSION_ID                     from /etc/os-release (the purl's namespace)
#   manager rpm|dpkg|none
#   P <tab separated fields>             rpm: NAME EPOCH VERSION RELEASE ARCH SOURCERPM LICENSE
#                                        dpkg: STATUS PACKAGE VERSION ARCH SOURCE SOURCE-VERSION
#   L PACKAGE LICENSE                    dpkg: the License: fields of a machine-readable
#                                        /usr/share/doc/PACKAGE/copyright
#
# An image made without a package manager (smoke) carries the list of the Debian packages it
# was made from in /usr/share/osimage/packages, in this format without its first line.
set -eu
out=${OSIMAGE_PACKAGES_OUTPUT:?}
record=/usr/share/osimage/packages
mkdir -p "$(dirname "$out")"
tab=$(printf '\t')
{
    printf 'osimage-packages 1\n'
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        (. /etc/os-release && printf 'os %s %s\n' "${ID:-unknown}" "${VERSION_ID:-}")
    fi
    # dpkg first: Debian ships the rpm tool with an empty database, EPEL dpkg an empty status;
    # busybox has rpm and dpkg applets without a database: look for the database itself
    # OSIMAGE_PACKAGES_MANAGER=rpm|dpkg chooses for an image that has both
    want=${OSIMAGE_PACKAGES_MANAGER:-auto}
    if [ "$want" = dpkg ] || { [ "$want" = auto ] && command -v dpkg-query >/dev/null 2>&1 \
            && [ -s /var/lib/dpkg/status ]; }; then
        printf 'manager dpkg\n'
        dpkg-query -W -f "P${tab}\${db:Status-Abbrev}${tab}\${Package}${tab}\${Version}${tab}\${Architecture}${tab}\${source:Package}${tab}\${source:Version}\n"
        # one awk over every copyright file (a process per package costs seconds under TCG)
        set -- /usr/share/doc/*/copyright
        if [ -e "$1" ]; then
            awk -v tab="$tab" '
                FNR == 1 { n = split(FILENAME, p, "/"); pkg = p[n - 1]
                           if ($0 !~ /^Format:/) nextfile }
                /^License:/ { sub(/^License:[ \t]*/, ""); sub(/[ \t\r]+$/, "")
                              if ($0 != "" && !seen[pkg tab $0]++) print "L" tab pkg tab $0 }
            ' "$@" 2>/dev/null || true
        fi
    elif [ "$want" = rpm ] || { [ "$want" = auto ] && command -v rpm >/dev/null 2>&1 \
            && { [ -d /var/lib/rpm ] || [ -d /usr/lib/sysimage/rpm ]; } \
            && ! [ "$(readlink -f "$(command -v rpm)")" = /bin/busybox ]; }; then
        printf 'manager rpm\n'
        rpm -qa --queryformat "P${tab}%{NAME}${tab}%{EPOCH}${tab}%{VERSION}${tab}%{RELEASE}${tab}%{ARCH}${tab}%{SOURCERPM}${tab}%{LICENSE}\n" \
            | grep -v "^P${tab}gpg-pubkey${tab}" || true
    elif [ -r "$record" ]; then
        cat "$record"
    else
        printf 'manager none\n'
    fi
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "$(grep -c "^P" "$out" || true) packages listed"
