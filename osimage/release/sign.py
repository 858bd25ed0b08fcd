"""`./build.py release sign X`: SHA256SUMS of a release with a detached GnuPG signature.

    releases/X/SHA256SUMS       sha256sum format, one line per file of the release, its path as
                                on the mirror (`sha256sum -c releases/X/SHA256SUMS` in the root)
    releases/X/SHA256SUMS.asc   detached, armored signature of SHA256SUMS

Signing uses the gpg binary with the user's own keyring or agent (GNUPGHOME, else ~/.gnupg) and
the key the site file names (`signing: {key: FINGERPRINT}`); osimage never sees a passphrase:
the user's gpg-agent asks for it (or has it cached). Checking never uses the user's keyring or
trust database: the public keys of manifests/keys/*.asc are imported into a temporary GNUPGHOME,
and a signature counts only when one of those keys made it.

Order of a signing, so that a failure at any point leaves nothing half signed: every file of
the release is re-hashed on the mirror; SHA256SUMS is written and signed; the signature is
checked against manifests/keys/ (a key missing there is refused before anything is published);
both files are published (immutable: a signed release's files never change); then the release
is marked signed in manifests/manifest.yaml (`signed: {key, date, sha256sums}`), after which
`release record`/`set`/`set-patches` refuse it. A signing that published but did not record
(interrupted) is completed by running it again: the files on the mirror are taken as they are
when they list the same files and their signature is good.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osimage import config
from osimage.errors import ConfigError
from osimage.publish.artifacts import record as record_artifact
from osimage.publish.mirror import open_mirror
from osimage.release import commands as release
from osimage.release.commands import MirrorReader, ReleaseError
from osimage.release.manifest import MANIFEST, Release, put
from osimage.release.patches import read_side_file
from osimage.runner import child_env

KEYS_DIR = "manifests/keys"
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.asc"
GPG = "gpg"
GPG_TIMEOUT = 300.0  # the user's agent may be asking for a passphrase
STATUS = "[GNUPG:] "
# gpg's INV_SGNR reasons (doc/DETAILS)
INVALID_SIGNER = {"1": "not found in your keyring", "2": "ambiguous", "3": "not usable to sign",
                  "4": "revoked", "5": "expired", "9": "no secret key for it in your keyring",
                  "13": "disabled"}


def release_dir(name: str) -> str:
    return f"releases/{name}"


@dataclass(frozen=True)
class Signed:
    """What manifest.yaml records of a signed release."""

    key: str
    date: str
    sha256sums: str

    def to_yaml(self) -> dict[str, str]:
        return {"key": self.key, "date": self.date, "sha256sums": self.sha256sums}


def signed_of(root: Path, name: str, doc: Any = None) -> Signed | None:
    """What manifest.yaml (doc: its parsed document, else read now) records of name's
    signature; None when it is not signed."""
    if doc is None:
        doc = release.load(root).doc
    data = doc["releases"].get(name)
    signed = data.get("signed") if data is not None else None
    if signed is None:
        return None
    return Signed(str(signed["key"]), str(signed["date"]), str(signed["sha256sums"]))


def sums_text(rel: Release) -> str:
    """SHA256SUMS: every file of the release, in the order manifest.yaml lists them."""
    lines = [f"{f.sha256}  {f.path}\n" for _, f in rel.files()]
    if not lines:
        raise ReleaseError(f"release {rel.name} has no files to sign")
    return "".join(lines)


# --- gpg ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpgResult:
    returncode: int
    status: list[list[str]]  # the [GNUPG:] lines, split into words
    stderr: str

    def first(self, keyword: str) -> list[str] | None:
        return next((words[1:] for words in self.status if words[0] == keyword), None)

    def reason(self) -> str:
        lines = [ln.removeprefix("gpg: ") for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


def _gpg(args: list[str], home: Path | None = None, timeout: float = GPG_TIMEOUT) -> GpgResult:
    """gpg --batch with its status lines on stdout; home None: the user's own GNUPGHOME."""
    argv = [GPG, "--batch", "--no-tty", "--status-fd", "1"]
    if home is not None:
        argv += ["--homedir", str(home), "--no-autostart", "--trust-model", "always"]
    try:
        proc = subprocess.run([*argv, *args], capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, env=child_env(), timeout=timeout)
    except FileNotFoundError:
        raise ConfigError(f"{GPG}: command not found",
                          hint="install GnuPG (apt-get install gnupg)") from None
    except subprocess.TimeoutExpired:
        raise ReleaseError(f"{GPG} did not finish within {timeout:.0f} s",
                           hint="is gpg-agent waiting for a passphrase nobody can type?") from None
    status = [line.removeprefix(STATUS).split() for line in proc.stdout.splitlines()
              if line.startswith(STATUS) and len(line) > len(STATUS)]
    return GpgResult(proc.returncode, status, proc.stderr)


def _invalid_signer(key: str, reason: str) -> ReleaseError:
    why = INVALID_SIGNER.get(reason, f"unusable (gpg reason {reason})")
    return ReleaseError(f"signing.key {key}: {why}; nothing was signed",
                        hint="gpg --list-secret-keys shows the keys you can sign with "
                             "(GNUPGHOME selects another keyring)")


def require_secret_key(root: Path, key: str) -> None:
    """Before hashing a whole release: the key is in the user's keyring with its secret half,
    and manifests/keys/ has keys to check its signature with."""
    key_files(root)
    if _gpg(["--with-colons", "--list-secret-keys", key]).returncode != 0:
        raise _invalid_signer(key, "9")


def sign_detached(key: str, data: Path, out: Path) -> str:
    """Sign data with key from the user's keyring or agent; return the signing fingerprint."""
    result = _gpg(["--local-user", key, "--armor", "--detach-sign", "--output", str(out),
                   str(data)])
    created = result.first("SIG_CREATED")
    if result.returncode == 0 and created is not None and out.is_file():
        return created[-1]
    invalid = result.first("INV_SGNR")
    if invalid is not None:
        raise _invalid_signer(key, invalid[0])
    raise ReleaseError(f"gpg could not sign with key {key}: {result.reason()}; nothing was "
                       "signed", hint="unlock the key in your gpg-agent, or set GPG_TTY for "
                                      "its pinentry (export GPG_TTY=$(tty))")


def key_files(root: Path) -> list[Path]:
    files = sorted((root / KEYS_DIR).glob("*.asc"))
    if not files:
        raise ConfigError(f"{KEYS_DIR}/: no public keys (*.asc) to check signatures with",
                          hint=f"gpg --armor --export FINGERPRINT > {KEYS_DIR}/NAME.asc, "
                               "then commit it")
    return files


@contextlib.contextmanager
def project_keyring(root: Path) -> Iterator[tuple[Path, set[str]]]:
    """A temporary GNUPGHOME holding manifests/keys/*.asc, and their primary fingerprints."""
    files = key_files(root)
    # short path: gpg's socket names must fit in a sockaddr_un
    home = Path(tempfile.mkdtemp(prefix="osimage-gpg-"))
    try:
        home.chmod(0o700)
        known: set[str] = set()
        for f in files:
            result = _gpg(["--import", str(f)], home=home)
            imported = {words[2] for words in result.status
                        if words[0] == "IMPORT_OK" and len(words) > 2}
            if not imported:
                raise ConfigError(f"{KEYS_DIR}/{f.name}: not an OpenPGP public key "
                                  f"({result.reason()})")
            known |= imported
        yield home, known
    finally:
        _remove_home(home)


def _remove_home(home: Path) -> None:
    if any(home.glob("S.*")):  # an agent started after all: it must not outlive its folder
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False,
                       capture_output=True, stdin=subprocess.DEVNULL, env=child_env())
    shutil.rmtree(home, ignore_errors=True)


def check_signature(root: Path, data: Path, signature: Path, shown: str) -> str:
    """The fingerprint of the manifests/keys/ key whose good signature signature is; else
    ReleaseError naming what is wrong (and the key, when it is not one of ours)."""
    with project_keyring(root) as (home, known):
        result = _gpg(["--verify", str(signature), str(data)], home=home)
    valid = result.first("VALIDSIG")
    bad = result.first("BADSIG")
    missing = result.first("ERRSIG")
    if bad is not None:
        raise ReleaseError(f"{shown}: BAD signature by key {bad[0]}: {SUMS} was changed after "
                           "it was signed")
    if missing is not None:
        # ERRSIG KEYID PKALGO HASHALGO CLASS TIME RC FPR (FPR since gpg 2.2.7, "-" if unknown)
        key = missing[6] if len(missing) > 6 and missing[6] != "-" else missing[0]
        if missing[5:6] == ["9"]:
            raise ReleaseError(f"{shown}: signed by key {key}, which is not in {KEYS_DIR}/; "
                               "refused", hint="a key the project trusts is committed there "
                                               f"as {KEYS_DIR}/NAME.asc")
        raise ReleaseError(f"{shown}: signature by key {key} cannot be checked "
                           f"({result.reason()})")
    for word in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG"):
        if (found := result.first(word)) is not None:
            what = {"EXPKEYSIG": "an expired key", "REVKEYSIG": "a revoked key",
                    "EXPSIG": "an expired signature"}[word]
            raise ReleaseError(f"{shown}: {what} ({found[0]}); refused")
    if result.returncode != 0 or valid is None or result.first("GOODSIG") is None:
        raise ReleaseError(f"{shown}: not a good signature of {SUMS} ({result.reason()})")
    primary = valid[-1]
    if primary not in known:  # cannot happen with a keyring of our keys only; said once here
        raise ReleaseError(f"{shown}: signed by key {primary}, which is not in {KEYS_DIR}/")
    return primary


# --- sign and verify ---------------------------------------------------------------------------


def signing_key(root: Path, site_file: Path | None) -> str:
    site = config.load_site(root, site_file)
    key = (site.data.get("signing") or {}).get("key")
    if not key:
        where = config.display_path(site.path, root) if site.path else "site.yaml"
        raise ConfigError(f"{where}: signing.key: no signing key named",
                          hint="signing: {key: FINGERPRINT} (gpg --list-secret-keys "
                               "--with-colons shows it)")
    return str(key).removeprefix("0x").upper()


def sign(root: Path, name: str, site_file: Path | None, mirror_url: str | None,
         accept_new_host_key: bool, say: Callable[[str], None]) -> Signed:
    """Sign release name and publish SHA256SUMS(.asc); return what manifest.yaml records."""
    rel = release.load(root).get(name)
    done = signed_of(root, name)
    if done is not None:
        say(f"    release {name} is already signed by {done.key} on {done.date}")
        return done
    key = signing_key(root, site_file)
    text = sums_text(rel)
    require_secret_key(root, key)
    reader = release.open_reader(root, site_file, mirror_url)
    rows = release.verify(rel, reader)
    release.require_verified(rel, rows, reader)  # sign only what the mirror holds
    say(f"    all {len(rows)} files of {name} match {reader.describe()}")
    site = config.load_site(root, site_file)
    shown = f"{release_dir(name)}/{SIGNATURE}"
    with tempfile.TemporaryDirectory(prefix="osimage-sign-") as tmp:
        sums, asc = Path(tmp) / SUMS, Path(tmp) / SIGNATURE
        on_mirror = read_side_file(reader, f"{release_dir(name)}/{SUMS}")
        if on_mirror is not None and on_mirror.decode(errors="replace") != text:
            raise ReleaseError(f"{release_dir(name)}/{SUMS} on the {reader.describe()} lists "
                               f"other files than release {name}: a signed release never "
                               "changes", hint="record a new release instead")
        old_asc = read_side_file(reader, shown) if on_mirror is not None else None
        sums.write_text(text)
        if old_asc is not None:  # published by a signing that was stopped before recording
            asc.write_bytes(old_asc)
            fingerprint = check_signature(root, sums, asc, shown)
            say(f"    {shown} already on the mirror, signed by {fingerprint}")
        else:
            signer = sign_detached(key, sums, asc)
            try:
                fingerprint = check_signature(root, sums, asc, shown)
            except ReleaseError as e:
                raise ReleaseError(f"{e.message}; nothing was published",
                                   hint=f"gpg --armor --export {key} > {KEYS_DIR}/NAME.asc, "
                                        "commit it, and sign again") from None
            say(f"    signed {SUMS} ({len(rows)} files) with {signer}")
        artifacts = [record_artifact(sums), record_artifact(asc)]
        mirror = open_mirror(site.mirror_url, root, site.data["mirror"], accept_new_host_key)
        mirror.publish(artifacts, release_dir(name))
        say(f"    published {release_dir(name)}/{SUMS} and {SIGNATURE} to {mirror.describe()}")
    signed = Signed(key=fingerprint, date=_now(), sha256sums=hashlib.sha256(
        text.encode()).hexdigest())

    def change(doc: Any) -> None:
        put(doc["releases"][name], "signed", signed.to_yaml())

    release.edit(root, change)
    return signed


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_signature(root: Path, rel: Release, reader: MirrorReader) -> str | None:
    """Check releases/X/SHA256SUMS(.asc) on the mirror: a good signature by a key of
    manifests/keys/, the file signed (its sha256 in manifest.yaml) and the same files and
    sha256s as the record. None for a release manifest.yaml does not mark signed; the file
    checks follow either way."""
    signed = signed_of(root, rel.name)
    if signed is None:
        return None
    base = release_dir(rel.name)
    data = read_side_file(reader, f"{base}/{SUMS}")
    sig = read_side_file(reader, f"{base}/{SIGNATURE}")
    for path, got in ((f"{base}/{SUMS}", data), (f"{base}/{SIGNATURE}", sig)):
        if got is None:
            raise ReleaseError(f"{path}: missing on the {reader.describe()} (release "
                               f"{rel.name} is signed)")
    assert data is not None and sig is not None
    with tempfile.TemporaryDirectory(prefix="osimage-verify-") as tmp:
        (Path(tmp) / SUMS).write_bytes(data)
        (Path(tmp) / SIGNATURE).write_bytes(sig)
        key = check_signature(root, Path(tmp) / SUMS, Path(tmp) / SIGNATURE,
                              f"{base}/{SIGNATURE}")
    _require_same_files(rel, data.decode(errors="replace"), f"{base}/{SUMS}")
    if hashlib.sha256(data).hexdigest() != signed.sha256sums:
        raise ReleaseError(f"{base}/{SUMS}: not the file signed on {signed.date} "
                           f"(sha256 differs from {MANIFEST})")
    return f"release {rel.name}: {SUMS} signed by {key} (a key of {KEYS_DIR}/)"


def _require_same_files(rel: Release, text: str, shown: str) -> None:
    listed: dict[str, str] = {}
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        listed[path] = digest
    recorded: Mapping[str, str] = {f.path: f.sha256 for _, f in rel.files()}
    for path, digest in recorded.items():
        if path not in listed:
            raise ReleaseError(f"{shown}: does not list {path} of release {rel.name}")
        if listed[path] != digest:
            raise ReleaseError(f"{shown}: {path}: sha256 {listed[path][:12]}... signed, "
                               f"{digest[:12]}... recorded in {MANIFEST}")
    extra = sorted(set(listed) - set(recorded))
    if extra:
        raise ReleaseError(f"{shown}: lists {extra[0]}, which release {rel.name} does not have")
