"""./build.py release sign|verify with real gpg, keys made in a temporary GNUPGHOME, a local
mirror folder served by a real HTTP server, and (the good case) a real sshd SSH mirror.

The signer's keyring is the temporary GNUPGHOME (as a user's ~/.gnupg would be); its keys have
no passphrase, so nothing is typed anywhere. Only trusted.asc is in the repository's
manifests/keys/; the stranger's key signs in the refusal cases.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.servers import HTTPServer, SSHServer
from tests.test_tidy import add_build, make_image_repo, run

MANIFEST = "manifests/manifest.yaml"


@dataclass(frozen=True)
class Keys:
    home: Path
    trusted: str
    stranger: str


def gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    out = subprocess.run(["gpg", "--batch", "--homedir", str(home), *args], input=data,
                         capture_output=True, check=True)
    return out.stdout


def make_key(home: Path, uid: str) -> str:
    gpg(home, "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key", uid,
        "ed25519", "sign", "never")
    for line in gpg(home, "--with-colons", "--list-secret-keys", uid).decode().splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    raise AssertionError(f"no fingerprint for {uid}")


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    # short path: gpg-agent's socket lives in it
    home = Path(tempfile.mkdtemp(prefix="osimage-test-gpg-"))
    home.chmod(0o700)
    try:
        yield Keys(home, make_key(home, "Release Team <release@osimage.invalid>"),
                   make_key(home, "Stranger <stranger@osimage.invalid>"))
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Setup:
    repo: Path
    mirror: Path
    http: str
    keys: Keys

    def site(self, key: str) -> None:
        (self.repo / "site.yaml").write_text(
            f"mirror:\n  url: {self.mirror}\n  http: {self.http}\nsigning:\n  key: '{key}'\n")

    def file(self, path: str) -> Path:
        return self.mirror / path


@pytest.fixture
def setup(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> Iterator[Setup]:
    repo = make_image_repo(tmp_path / "repo")
    monkeypatch.setenv("OSIMAGE_ROOT", str(repo))
    monkeypatch.setenv("GNUPGHOME", str(keys.home))
    shutil.copytree(PROJECT / "templates" / "release", repo / "templates" / "release")
    (repo / "manifests" / "keys").mkdir()
    (repo / "manifests" / "keys" / "release-team.asc").write_bytes(
        gpg(keys.home, "--armor", "--export", keys.trusted))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    add_build(repo, "smoke", "1.0", mirror=mirror)
    add_build(repo, "base", "2.0", mirror=mirror)
    with HTTPServer(mirror) as http:
        s = Setup(repo, mirror, http.url, keys)
        s.site(keys.trusted)
        code, _, err = run(capsys, "release", "record", "1.0.0")
        assert code == 0, err
        yield s


def test_sign_writes_sha256sums_and_a_good_signature(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 0, err
    assert f"release 1.0.0 signed by {setup.keys.trusted}" in out
    sums = setup.file("releases/1.0.0/SHA256SUMS")
    lines = sums.read_text().splitlines()
    expected = {}
    for image, version in (("smoke", "1.0"), ("base", "2.0")):
        path = f"builds/{image}/{version}/{image}.qcow2"
        expected[path] = hashlib.sha256(setup.file(path).read_bytes()).hexdigest()
    assert sorted(lines) == sorted(f"{h}  {p}" for p, h in expected.items())
    # the formats the world checks with: sha256sum -c from the mirror root, gpg --verify
    check = subprocess.run(["sha256sum", "-c", "releases/1.0.0/SHA256SUMS"], cwd=setup.mirror,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    asc = setup.file("releases/1.0.0/SHA256SUMS.asc")
    assert asc.read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    status = subprocess.run(["gpg", "--batch", "--homedir", str(setup.keys.home), "--status-fd",
                             "1", "--verify", str(asc), str(sums)], capture_output=True,
                            text=True)
    assert f"VALIDSIG {setup.keys.trusted}" in status.stdout
    assert "signed:\n      key: " + setup.keys.trusted in (setup.repo / MANIFEST).read_text()
    assert setup.file("releases/index.html").is_file()
    assert setup.file("releases/1.0.0/index.html").is_file()

    code, out, err = run(capsys, "release", "verify", "1.0.0")
    assert code == 0, err
    assert f"release 1.0.0: SHA256SUMS signed by {setup.keys.trusted}" in out
    assert "release 1.0.0: all 2 files match" in out
    # signing again changes nothing
    before = sorted(p.read_bytes() for p in setup.mirror.rglob("SHA256SUMS*"))
    code, out, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 0, err
    assert "already signed" in err
    assert sorted(p.read_bytes() for p in setup.mirror.rglob("SHA256SUMS*")) == before


def test_a_key_not_in_manifests_keys_is_refused_naming_it(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.site(setup.keys.stranger)
    manifest = (setup.repo / MANIFEST).read_text()
    code, _, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 1
    assert ("\nerror: releases/1.0.0/SHA256SUMS.asc: signed by key "
            f"{setup.keys.stranger}, which is not in manifests/keys/; refused; nothing was "
            "published\n") in err
    assert "Traceback" not in err
    assert not setup.file("releases").exists()
    assert (setup.repo / MANIFEST).read_text() == manifest

    # a signature made by the stranger and put on the mirror: verify refuses it
    setup.site(setup.keys.trusted)
    assert run(capsys, "release", "sign", "1.0.0")[0] == 0
    asc = setup.file("releases/1.0.0/SHA256SUMS.asc")
    asc.write_bytes(gpg(setup.keys.home, "--local-user", setup.keys.stranger, "--armor",
                        "--detach-sign", "--output", "-",
                        str(setup.file("releases/1.0.0/SHA256SUMS"))))
    code, _, err = run(capsys, "release", "verify", "1.0.0")
    assert code == 1
    assert f"signed by key {setup.keys.stranger}, which is not in manifests/keys/" in err


def test_a_tampered_sha256sums_is_a_bad_signature(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "release", "sign", "1.0.0")[0] == 0
    sums = setup.file("releases/1.0.0/SHA256SUMS")
    text = sums.read_text()
    sums.write_text(("1" if text[0] != "1" else "2") + text[1:])
    code, _out, err = run(capsys, "release", "verify", "1.0.0")
    assert code == 1
    assert "\nerror: releases/1.0.0/SHA256SUMS.asc: BAD signature by key " in "\n" + err
    assert "SHA256SUMS was changed after it was signed" in err


def test_a_tampered_file_on_the_mirror_is_found(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "release", "sign", "1.0.0")[0] == 0
    disk = setup.file("builds/smoke/1.0/smoke.qcow2")
    data = bytearray(disk.read_bytes())
    data[100] ^= 0xFF
    disk.write_bytes(bytes(data))
    code, out, err = run(capsys, "release", "verify", "1.0.0")
    assert code == 1
    assert "SHA256SUMS signed by" in out  # the signature is fine: the file is not
    assert "error: release 1.0.0: 1 of 2 files do not match" in err
    assert "builds/smoke/1.0/smoke.qcow2 (sha256" in err


def test_a_signed_release_cannot_be_recorded_again(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "release", "sign", "1.0.0")[0] == 0
    add_build(setup.repo, "smoke", "1.1", mirror=setup.mirror)
    manifest = (setup.repo / MANIFEST).read_text()
    for args in (("release", "record", "1.0.0", "--force"),
                 ("release", "set", "1.0.0", "smoke", "--version", "1.1", "--force"),
                 ("release", "set-patches", "1.0.0", "repos/Rocky8/p.tar.gz", "--force")):
        code, _out, err = run(capsys, *args)
        assert code == 2, (args, err)
        first = err.splitlines()[0]
        assert first.startswith("error: manifests/manifest.yaml: release 1.0.0 is signed (key "
                                f"{setup.keys.trusted}, "), first
        assert first.endswith("a signed release never changes")
        assert (setup.repo / MANIFEST).read_text() == manifest
    # another release still records
    assert run(capsys, "release", "record", "1.1.0")[0] == 0


def test_sign_and_verify_over_the_ssh_mirror(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    with SSHServer() as ssh, HTTPServer(ssh.root) as http:
        shutil.copytree(setup.mirror / "builds", ssh.root / "builds")
        (setup.repo / "site.yaml").write_text(
            f"mirror:\n  url: {ssh.url}\n  http: {http.url}\n"
            f"  identity_file: {ssh.client_key}\n  known_hosts: {ssh.known_hosts}\n"
            f"signing:\n  key: {setup.keys.trusted}\n")
        code, out, err = run(capsys, "release", "sign", "1.0.0")
        assert code == 0, err
        assert (ssh.root / "releases/1.0.0/SHA256SUMS.asc").is_file()
        check = subprocess.run(["sha256sum", "-c", "releases/1.0.0/SHA256SUMS"], cwd=ssh.root,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        assert (ssh.root / "releases/index.html").is_file()
        assert not list(ssh.root.rglob(".*partial*"))
        code, out, err = run(capsys, "release", "verify", "1.0.0")
        assert code == 0, err
        assert f"SHA256SUMS signed by {setup.keys.trusted}" in out
        assert f"all 2 files match mirror {http.url}" in out


def test_a_missing_or_malformed_signing_key_is_one_line_exit_2(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = (setup.repo / MANIFEST).read_text()
    setup.site("DEADBEEF")
    code, _, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 2
    assert err.startswith("error: site.yaml: signing.key: ") and "40-digit fingerprint" in err
    (setup.repo / "site.yaml").write_text(f"mirror:\n  url: {setup.mirror}\n")
    code, _, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 2
    assert err.startswith("error: site.yaml: signing.key: no signing key named\n")
    # a key gpg does not have: one line naming it, nothing signed or published
    setup.site("0" * 40)
    code, _, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 1, err
    assert err.splitlines()[-2] == (f"error: signing.key {'0' * 40}: no secret key for it in your "
                                    "keyring; nothing was signed")
    assert "Traceback" not in err
    assert not setup.file("releases").exists()
    assert (setup.repo / MANIFEST).read_text() == manifest
    # no key in manifests/keys/: nothing to check a signature with, said before any hashing
    setup.site(setup.keys.trusted)
    (setup.repo / "manifests" / "keys" / "release-team.asc").unlink()
    code, _, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 2
    assert err.splitlines()[0] == ("error: manifests/keys/: no public keys (*.asc) to check "
                                   "signatures with")
    assert "match" not in err
    assert not setup.file("releases").exists()
    assert (setup.repo / MANIFEST).read_text() == manifest


def test_a_signing_stopped_before_recording_is_completed_by_signing_again(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """Published but not marked signed (the process was killed in between): the files on
    the mirror are taken as they are, never signed anew (they could not be replaced)."""
    manifest = (setup.repo / MANIFEST).read_text()
    assert run(capsys, "release", "sign", "1.0.0")[0] == 0
    published = {p: p.read_bytes() for p in setup.mirror.rglob("SHA256SUMS*")}
    (setup.repo / MANIFEST).write_text(manifest)
    code, _, err = run(capsys, "release", "sign", "1.0.0")
    assert code == 0, err
    assert "releases/1.0.0/SHA256SUMS.asc already on the mirror, signed by" in err
    assert {p: p.read_bytes() for p in setup.mirror.rglob("SHA256SUMS*")} == published
    assert run(capsys, "release", "verify", "1.0.0")[0] == 0
    # a signature that went missing from the mirror
    setup.file("releases/1.0.0/SHA256SUMS.asc").unlink()
    code, _out, err = run(capsys, "release", "verify", "1.0.0")
    assert code == 1
    assert err.startswith("error: releases/1.0.0/SHA256SUMS.asc: missing on the mirror http")


def test_a_passphrase_protected_key_signs_through_the_agent(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The passphrase reaches the user's gpg-agent (preset here, as a pinentry would), never
    osimage: without it, signing fails in one line and nothing is published."""
    home = Path(tempfile.mkdtemp(prefix="osimage-test-gpg-"))
    try:
        home.chmod(0o700)
        (home / "gpg-agent.conf").write_text("allow-preset-passphrase\n")
        gpg(home, "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--quick-gen-key",
            "Locked <locked@osimage.invalid>", "ed25519", "sign", "never", data=b"s3cret")
        colons = gpg(home, "--with-colons", "--with-keygrip", "--list-secret-keys").decode()
        fpr = next(ln.split(":")[9] for ln in colons.splitlines() if ln.startswith("fpr:"))
        grip = next(ln.split(":")[9] for ln in colons.splitlines() if ln.startswith("grp:"))
        (setup.repo / "manifests" / "keys" / "locked.asc").write_bytes(
            gpg(home, "--armor", "--export", fpr))
        monkeypatch.setenv("GNUPGHOME", str(home))
        monkeypatch.delenv("GPG_TTY", raising=False)
        setup.site(fpr)
        code, _, err = run(capsys, "release", "sign", "1.0.0")
        assert code == 1
        assert f"\nerror: gpg could not sign with key {fpr}: signing failed: " in "\n" + err
        assert "; nothing was signed\n" in err
        assert not setup.file("releases").exists()

        subprocess.run(["/usr/lib/gnupg/gpg-preset-passphrase", "--preset", grip],
                       input=b"s3cret", check=True, env={**os.environ, "GNUPGHOME": str(home)})
        code, out, err = run(capsys, "release", "sign", "1.0.0")
        assert code == 0, err
        assert f"release 1.0.0 signed by {fpr}" in out
        assert run(capsys, "release", "verify", "1.0.0")[0] == 0
        written = [p.read_bytes() for p in (*setup.mirror.rglob("*"), setup.repo / MANIFEST)
                   if p.is_file()]
        assert not any(b"s3cret" in data for data in written)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)
