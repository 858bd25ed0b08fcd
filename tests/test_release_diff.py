"""Version order of rpm and dpkg against the real tools, and the rpm path of the package list
against a real rpm database made on the host (rpmbuild, rpm --root), without a VM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from osimage.features import packages
from osimage.release import diff, versions

# cases that break string order: 1.10 vs 1.9, epochs, tildes, carets, letters vs digits,
# leading zeros, separators
RPM_CASES = [
    ("1.10", "1.9"), ("1.9", "1.10"), ("1.0", "1.0"), ("1.0~rc1", "1.0"), ("1.0~rc1", "1.0~rc2"),
    ("1.0~~", "1.0~"), ("1.0^git1", "1.0"), ("1.0^git1", "1.0.1"), ("1.0~rc1^x", "1.0~rc1"),
    ("1.0^", "1.0"), ("a", "1"), ("1a", "1.a"), ("2.0", "2.0.0"), ("1.0a", "1.0"),
    ("1.0", "1.0_1"), ("001", "1"), ("5.5p1", "5.5p10"), ("abc", "abd"), ("1.0.", "1.0"),
    ("10", "9"), ("1.el8", "1.el8_5"), ("4.18.0-80.el8", "4.18.0-348.el8"), ("xyz", "XYZ"),
    ("2.0.1a", "2.0.1"), ("1++", "1_"), ("0010", "10"),
]
DEB_CASES = [
    ("1.10", "1.9"), ("1:1.0", "2.0"), ("1.0~rc1", "1.0"), ("1.0~", "1.0~~"), ("1.0-1", "1.0"),
    ("1.0a", "1.0+"), ("1.0+", "1.0."), ("2.30-1~bpo12+1", "2.30-1"), ("7:1", "10:0"),
    ("1.0-1.1", "1.0-1a"), ("1.0", "1.0-0"), ("1.2.3", "1.2.3.0"), ("0:1.0", "1.0"),
    ("1.0-1+deb12u1", "1.0-1"), ("1.0-10", "1.0-9"), ("1:9.2p1-2+deb12u10", "1:9.2p1-2+deb12u9"),
    ("6.1.0-10", "6.1.0-9"), ("1.0~rc1-1", "1.0-1"), ("2:1.0", "1:9.9"), ("1.0-a", "1.0-A"),
]


def rpm_vercmp(a: str, b: str) -> int:
    out = subprocess.run(["rpm", "--eval", f'%{{lua: print(rpm.vercmp("{a}", "{b}"))}}'],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def dpkg_compare(a: str, b: str) -> int:
    def holds(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b],
                              capture_output=True).returncode == 0

    return -1 if holds("lt") else 0 if holds("eq") else 1


@pytest.mark.parametrize(("a", "b"), RPM_CASES)
def test_rpmvercmp_agrees_with_rpm(a: str, b: str) -> None:
    assert versions.rpmvercmp(a, b) == rpm_vercmp(a, b)
    assert versions.rpmvercmp(b, a) == rpm_vercmp(b, a)


@pytest.mark.parametrize(("a", "b"), DEB_CASES)
def test_deb_order_agrees_with_dpkg(a: str, b: str) -> None:
    assert versions.deb_compare(a, b) == dpkg_compare(a, b)
    assert versions.deb_compare(b, a) == dpkg_compare(b, a)


def test_string_order_is_not_version_order() -> None:
    assert "1.10" < "1.9" and versions.rpmvercmp("1.10", "1.9") == 1
    assert versions.rpm_evr_compare(("1", "1.0", "1"), ("", "9.9", "1")) == 1  # epoch wins
    assert versions.split_deb("1:9.2p1-2+deb12u10") == ("1", "9.2p1", "2+deb12u10")
    assert versions.split_deb("1.0-beta-3") == ("", "1.0-beta", "3")


# --- the rpm path: a real rpm database ----------------------------------------------------------

SPEC = """Name: osimage-tiny
Epoch: %{ep}
Version: %{ver}
Release: 1.el8
Summary: tiny package for the package-list test
License: MIT AND (GPL-2.0-or-later OR BSD-3-Clause)
BuildArch: noarch
%description
tiny
%install
mkdir -p %{buildroot}/usr/share/osimage-tiny
echo %{ver} > %{buildroot}/usr/share/osimage-tiny/VERSION
%files
/usr/share/osimage-tiny/VERSION
"""


def rpm_root(tmp_path: Path, builds: list[tuple[str, str, str]]) -> Path:
    """A root with an rpm database at /var/lib/rpm (as Rocky has it) holding the packages
    rpmbuild made, each (name, epoch, version)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "root"
    top = tmp_path / "top"
    for name, epoch, version in builds:
        spec = tmp_path / f"{name}.spec"
        spec.write_text(SPEC.replace("osimage-tiny", name))
        subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {top}", "--define",
                        f"ep {epoch}", "--define", f"ver {version}", str(spec)],
                       check=True, capture_output=True)
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "--initdb"],
                   check=True)
    rpms = sorted(str(p) for p in (top / "RPMS").rglob("*.rpm"))
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-i", "--nodeps",
                    "--noscripts", "--ignoreos", *rpms], check=True, capture_output=True)
    return root


def guest_list(tmp_path: Path, root: Path) -> packages.PackageList:
    """The package-list script, as the VM runs it, against the database under root (rpm finds
    it through the %_dbpath of $HOME/.rpmmacros)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / ".rpmmacros").write_text(f"%_dbpath {root}/var/lib/rpm\n")
    out = tmp_path / "list.txt"
    subprocess.run(["sh", str(packages.SCRIPT)], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                        "OSIMAGE_PACKAGES_MANAGER": "rpm", "OSIMAGE_PACKAGES_OUTPUT": str(out)})
    return packages.parse(out.read_text())


def test_rpm_list_matches_the_database_and_orders_by_rpm(tmp_path: Path) -> None:
    old_root = rpm_root(tmp_path / "a", [("osimage-tiny", "1", "1.9"),
                                         ("osimage-gone", "0", "2.0"),
                                         ("osimage-back", "2", "1.0")])
    new_root = rpm_root(tmp_path / "b", [("osimage-tiny", "1", "1.10"),
                                         ("osimage-new", "0", "0.1"),
                                         ("osimage-back", "1", "9.9")])
    old, new = guest_list(tmp_path / "a", old_root), guest_list(tmp_path / "b", new_root)
    assert old.manager == "rpm"
    want = subprocess.run(["rpm", "--root", str(new_root), "--dbpath", "/var/lib/rpm", "-qa",
                           "--qf", "%{NAME} %{EPOCH} %{VERSION} %{RELEASE} %{ARCH} "
                           "%{SOURCERPM}\n"], capture_output=True, text=True, check=True)
    assert sorted(f"{p.name} {p.epoch or '(none)'} {p.version} {p.release} {p.arch} {p.source}"
                  for p in new.packages) == sorted(want.stdout.splitlines())
    tiny = next(p for p in new.packages if p.name == "osimage-tiny")
    assert tiny.licenses == ("MIT AND (GPL-2.0-or-later OR BSD-3-Clause)",)
    assert tiny.source == "osimage-tiny-1.10-1.el8.src.rpm"
    assert new.purl(tiny) == "pkg:rpm/debian/osimage-tiny@1.10-1.el8?arch=noarch&distro=" \
                             "debian-12&epoch=1"

    d = diff.compare_lists("rocky", "rpm", old.packages, new.packages)
    assert [(c.name, c.old, c.new) for c in d.upgraded] == \
        [("osimage-tiny", "1:1.9-1.el8", "1:1.10-1.el8")]  # 1.10 after 1.9
    assert [(c.name, c.old, c.new) for c in d.downgraded] == \
        [("osimage-back", "2:1.0-1.el8", "1:9.9-1.el8")]  # the epoch counts first
    assert [c.name for c in d.added] == ["osimage-new"]
    assert [c.name for c in d.removed] == ["osimage-gone"]

    sbom = packages.cyclonedx(new, "rocky-test", "1.0", 1700000000)
    assert_valid_cyclonedx(sbom)
    purls = {c["purl"] for c in json.loads(sbom)["components"]}
    assert new.purl(tiny) in purls


def assert_valid_cyclonedx(text: str) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    validator = JsonStrictValidator(SchemaVersion.V1_6)
    assert validator.validate_str(text) is None
    broken = json.loads(text)
    broken["components"][0]["purl"] = 42  # the validator does check: a broken SBOM fails
    assert validator.validate_str(json.dumps(broken)) is not None


def test_kernels_installed_side_by_side_diff_by_version() -> None:
    def k(version: str) -> packages.Package:
        return packages.Package("kernel", "", "4.18.0", version, "x86_64")

    d = diff.compare_lists("r", "rpm", [k("348.el8"), k("372.el8")],
                           [k("372.el8"), k("477.el8")])
    assert [c.old for c in d.removed] == ["4.18.0-348.el8"]
    assert [c.new for c in d.added] == ["4.18.0-477.el8"]
    assert not d.upgraded and not d.downgraded


def test_bad_guest_output_is_refused() -> None:
    with pytest.raises(packages.PackageListError):
        packages.parse("hello\n")
    with pytest.raises(packages.PackageListError):
        packages.parse("osimage-packages 1\nmanager dpkg\nP\tii \tonly-three\n")
