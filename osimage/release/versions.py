"""Version order of the package managers, as their own C code has it: rpm's rpmvercmp (with
`~` before anything and `^` after the base) and dpkg's verrevcmp (`~` before the empty string,
letters before other characters). String order gets 1.10 < 1.9 and every epoch wrong.

Checked against `rpm --eval '%{lua: print(rpm.vercmp(A, B))}'` and `dpkg --compare-versions`
in tests/test_release_diff.py.
"""

from __future__ import annotations

import string

_DIGITS = frozenset(string.digits)
_ALPHA = frozenset(string.ascii_letters)  # rpm and dpkg test ASCII classes, not Unicode
_ALNUM = _DIGITS | _ALPHA


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


def rpmvercmp(a: str, b: str) -> int:
    """-1, 0 or 1: rpm's comparison of two version (or release) strings."""
    if a == b:
        return 0
    i = j = 0
    la, lb = len(a), len(b)
    while i < la or j < lb:
        while i < la and a[i] not in _ALNUM and a[i] not in "~^":
            i += 1
        while j < lb and b[j] not in _ALNUM and b[j] not in "~^":
            j += 1
        ca, cb = a[i:i + 1], b[j:j + 1]
        if ca == "~" or cb == "~":  # sorts before everything, even the end
            if ca != "~":
                return 1
            if cb != "~":
                return -1
            i, j = i + 1, j + 1
            continue
        if ca == "^" or cb == "^":  # sorts after the end, before anything else
            if not ca:
                return -1
            if not cb:
                return 1
            if ca != "^":
                return 1
            if cb != "^":
                return -1
            i, j = i + 1, j + 1
            continue
        if not (ca and cb):
            break
        kind = _DIGITS if ca in _DIGITS else _ALPHA
        ei, ej = i, j
        while ei < la and a[ei] in kind:
            ei += 1
        while ej < lb and b[ej] in kind:
            ej += 1
        if ej == j:  # a number is newer than letters
            return 1 if kind is _DIGITS else -1
        sa, sb = a[i:ei], b[j:ej]
        if kind is _DIGITS:
            sa, sb = sa.lstrip("0"), sb.lstrip("0")
            if len(sa) != len(sb):
                return 1 if len(sa) > len(sb) else -1
        if sa != sb:
            return 1 if sa > sb else -1
        i, j = ei, ej
    if i >= la and j >= lb:
        return 0
    return -1 if i >= la else 1


def rpm_evr_compare(a: tuple[str, str, str], b: tuple[str, str, str]) -> int:
    """(epoch, version, release) in rpm's order; an empty epoch is 0."""
    ea, eb = int(a[0] or 0), int(b[0] or 0)
    if ea != eb:
        return _sign(ea - eb)
    return rpmvercmp(a[1], b[1]) or rpmvercmp(a[2], b[2])


def _order(c: str) -> int:
    if not c or c in _DIGITS:
        return 0
    if c in _ALPHA:
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def verrevcmp(a: str, b: str) -> int:
    """dpkg's comparison of two upstream versions (or revisions): -1, 0 or 1."""
    i = j = 0
    la, lb = len(a), len(b)
    while i < la or j < lb:
        first_diff = 0
        while (i < la and a[i] not in _DIGITS) or (j < lb and b[j] not in _DIGITS):
            ac, bc = _order(a[i:i + 1]), _order(b[j:j + 1])
            if ac != bc:
                return _sign(ac - bc)
            i, j = i + 1, j + 1
        while i < la and a[i] == "0":
            i += 1
        while j < lb and b[j] == "0":
            j += 1
        while i < la and j < lb and a[i] in _DIGITS and b[j] in _DIGITS:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < la and a[i] in _DIGITS:
            return 1
        if j < lb and b[j] in _DIGITS:
            return -1
        if first_diff:
            return _sign(first_diff)
    return 0


def split_deb(version: str) -> tuple[str, str, str]:
    """(epoch, upstream, revision) of a Debian version: epoch before the first ':', revision
    after the last '-' (both may be empty)."""
    epoch, colon, rest = version.partition(":")
    if not colon:
        epoch, rest = "", version
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return epoch, upstream, revision


def deb_compare(a: str, b: str) -> int:
    """Two full Debian versions in dpkg's order (`dpkg --compare-versions`)."""
    ea, ua, ra = split_deb(a)
    eb, ub, rb = split_deb(b)
    if int(ea or 0) != int(eb or 0):
        return _sign(int(ea or 0) - int(eb or 0))
    return verrevcmp(ua, ub) or verrevcmp(ra, rb)


def compare(manager: str, a: tuple[str, str, str], b: tuple[str, str, str]) -> int:
    """(epoch, version, release) of one package in two lists, in its manager's order."""
    if manager == "rpm":
        return rpm_evr_compare(a, b)
    return deb_compare(deb_version(*a), deb_version(*b))


def deb_version(epoch: str, upstream: str, revision: str) -> str:
    return f"{epoch + ':' if epoch else ''}{upstream}{'-' + revision if revision else ''}"
