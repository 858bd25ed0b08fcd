"""The release pages (releases/index.html, releases/X/index.html) in a real headless browser.

Two releases over a local mirror served by a real HTTP server; the second is signed with real
gpg (keys from test_release_sign.py), has a patch tarball with its advisory index, package
lists on both sides, and hostile text in its description, advisories and package names.
Debian's chromium loads the pages from the HTTP mirror (--dump-dom: the DOM after parsing,
--screenshot at a phone's size, kept in the test's tmp folder).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from tests.conftest import PROJECT, make_repo
from tests.servers import HTTPServer
from tests.test_release_sign import Keys, gpg, keys  # noqa: F401 (the module's gpg keys)
from tests.test_tidy import add_build, make_image_repo, run

PATCHES = "repos/Rocky8/rocky8-patches-20261126.tar.gz"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
PHONE = "412,915"


def chromium(url: str, profile: Path, *args: str) -> str:
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", f"--window-size={PHONE}", *args, url],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Text(HTMLParser):
    """The text a person reads, and the elements the DOM holds."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k == "href" and v]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def read_dom(dom: str) -> _Text:
    parser = _Text()
    parser.feed(dom)
    return parser


def words(parser: _Text) -> str:
    return re.sub(r"\s+", " ", " ".join(parser.text))


@pytest.fixture
def site(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
         capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Path, Path, str]]:
    repo = make_image_repo(tmp_path / "repo")
    monkeypatch.setenv("OSIMAGE_ROOT", str(repo))
    monkeypatch.setenv("GNUPGHOME", str(keys.home))
    shutil.copytree(PROJECT / "templates" / "release", repo / "templates" / "release")
    (repo / "manifests" / "keys").mkdir()
    (repo / "manifests" / "keys" / "release-team.asc").write_bytes(
        gpg(keys.home, "--armor", "--export", keys.trusted))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with HTTPServer(mirror) as http:
        (repo / "site.yaml").write_text(f"mirror:\n  url: {mirror}\n  http: {http.url}\n"
                                        f"signing:\n  key: {keys.trusted}\n")
        yield repo, mirror, http.url


def publish_packages(mirror: Path, image: str, version: str, nevras: list[str]) -> None:
    path = mirror / "builds" / image / version / f"{image}.packages.json"
    path.write_text(json.dumps({"packages": nevras}))


def publish_patches(mirror: Path) -> None:
    tarball = mirror / PATCHES
    tarball.parent.mkdir(parents=True)
    tarball.write_bytes(b"not really a tarball, the page only links it" * 100)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    Path(f"{tarball}.sha256").write_text(f"{digest}  {tarball.name}\n")
    index = {"sha256": digest, "size": tarball.stat().st_size, "advisories": [
        {"id": "RLSA-2026:1234", "type": "Important/Sec.", "packages": ["openssl-3.0.7-1.el8"]},
        {"id": "RLSA-2026:9999", "type": "<b>Critical</b>", "packages": [HOSTILE]},
    ], "packages": ["openssl-3.0.7-1.el8.x86_64"]}
    (mirror / "repos/Rocky8/rocky8-patches-20261126.index.json").write_text(json.dumps(index))


def test_release_pages_in_a_headless_browser(
        site: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, mirror, url = site
    add_build(repo, "smoke", "1.0", mirror=mirror)
    publish_packages(mirror, "smoke", "1.0", ["bash-5.1-1.el8.x86_64", "gone-1.0-1.el8.noarch",
                                              "same-2.0-1.el8.noarch"])
    assert run(capsys, "release", "record", "1.0.0")[0] == 0
    smoke = add_build(repo, "smoke", "1.1", mirror=mirror)
    publish_packages(mirror, "smoke", "1.1", ["bash-5.2-1.el8.x86_64", "same-2.0-1.el8.noarch",
                                              "newpkg-0.1-1.el8.x86_64", HOSTILE + "-1-1.x"])
    assert run(capsys, "release", "record", "1.1.0")[0] == 0
    publish_patches(mirror)
    code, _, err = run(capsys, "release", "set-patches", "1.1.0", PATCHES)
    assert code == 0, err
    text = (repo / "manifests/manifest.yaml").read_text()
    (repo / "manifests/manifest.yaml").write_text(
        text.replace("  1.1.0:\n", f"  1.1.0:\n    description: '{HOSTILE}'\n"))
    code, out, err = run(capsys, "release", "sign", "1.1.0")
    assert code == 0, err
    assert "published releases/index.html" in out

    # no JavaScript, and no markup from the values
    for page in (mirror / "releases/index.html", mirror / "releases/1.1.0/index.html"):
        html = page.read_text()
        assert "<script" not in html and "<img" not in html and "<b>" not in html
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in \
        (mirror / "releases/1.1.0/index.html").read_text()

    profile = tmp_path / "chromium-profile"
    index = read_dom(chromium(f"{url}/releases/index.html", profile, "--dump-dom"))
    seen = words(index)
    assert seen.index("1.1.0") < seen.index("1.0.0"), seen  # newest first
    assert re.search(r"1\.1\.0 .* smoke 1\.1 \d{4}-\d\d-\d\d signed", seen), seen
    assert re.search(r"1\.0\.0 smoke 1\.0 not committed yet not signed", seen), seen
    assert HOSTILE in seen  # shown as text
    assert not {"script", "img"} & index.tags

    page_url = f"{url}/releases/1.1.0/index.html"
    dom = read_dom(chromium(page_url, profile, "--dump-dom"))
    seen = words(dom)
    digest = smoke["custom_data"]["sha256"]["smoke.qcow2"]
    for expected in ("Release 1.1.0", "signed by key", "smoke 1.1", "smoke.qcow2", digest,
                     "SHA256SUMS", "SHA256SUMS.asc", "rocky8-patches-20261126.tar.gz",
                     "RLSA-2026:1234", "Important/Sec.", "openssl-3.0.7-1.el8",
                     "<b>Critical</b>", "Package changes since 1.0.0",
                     "+ newpkg", "~ bash 5.1-1.el8.x86_64 5.2-1.el8.x86_64",
                     "- gone 1.0-1.el8.noarch", f"+ {HOSTILE}"):
        assert expected in seen, (expected, seen)
    assert "same-2.0" not in seen and "~ same" not in seen
    assert not {"script", "img", "b"} & dom.tags
    # the links work from the page, as a person clicks them
    for link in dom.links:
        if link.endswith(("smoke.qcow2", "SHA256SUMS.asc", ".tar.gz")):
            got = requests.get(requests.compat.urljoin(page_url, link), timeout=30)
            assert got.status_code == 200, link
    assert any(link.endswith("builds/smoke/1.1/smoke.qcow2") for link in dom.links)
    body = requests.get(requests.compat.urljoin(page_url, "../../builds/smoke/1.1/smoke.qcow2"),
                        timeout=30).content
    assert hashlib.sha256(body).hexdigest() == digest

    for name, shown in (("releases-phone.png", f"{url}/releases/index.html"),
                        ("release-1.1.0-phone.png", page_url)):
        shot = tmp_path / name
        chromium(shown, profile, f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_publish_index_without_signing(
        site: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    repo, mirror, _ = site
    add_build(repo, "smoke", "1.0", mirror=mirror)
    assert run(capsys, "release", "record", "1.0.0")[0] == 0
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", "release 1.0.0"], check=True)
    code, _out, err = run(capsys, "release", "publish-index")
    assert code == 0, err
    html = (mirror / "releases/index.html").read_text()
    assert "not signed" in html and ">1.0.0</a>" in html
    assert not (mirror / "releases/1.0.0/SHA256SUMS").exists()
    page = (mirror / "releases/1.0.0/index.html").read_text()
    assert "Not available: no package list." in page
    assert "None in this release." in page
    # committed: the page gives the day it was committed
    day = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%cs"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert f'<span class="nowrap">{day}</span>' in html
    # the pages are replaced when written again (they are not part of a signed release)
    assert run(capsys, "release", "record", "1.0.1")[0] == 0
    assert run(capsys, "release", "publish-index")[0] == 0
    assert ">1.0.1</a>" in (mirror / "releases/index.html").read_text()


def test_the_page_templates_are_no_build_input(tmp_path: Path) -> None:
    """Editing a release page must not make every image out of date (templates/ is an input
    of every build, templates/release/ is not)."""
    from osimage import config
    from osimage.build.context import BuildContext
    from osimage.build.inputs import inputs_hash

    root = make_repo(tmp_path / "repo")
    ctx = BuildContext(root=root, image=config.load_image(root, "smoke"),
                       site=config.load_site(root, None), git=None,  # type: ignore[arg-type]
                       version="1.0", release=None, work_dir=tmp_path / "work",
                       source_checksum="sha256:" + "0" * 64)
    before = inputs_hash(ctx)
    page = root / "templates" / "release" / "release.html.j2"
    page.write_text(page.read_text() + "<p>changed</p>\n")
    assert inputs_hash(ctx) == before
    hcl = root / "templates" / "qemu.pkr.hcl.j2"
    hcl.write_text(hcl.read_text() + "\n")
    assert inputs_hash(ctx) != before
