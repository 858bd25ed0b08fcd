"""The libvirt backend against a real libvirtd (started here when it is not running):
preflight checks and their hints, streams in and out of a pool, what builds leave behind and
`./build.py clean`, and failed or interrupted builds with a failure injected by
tests/fake_packer_libvirt.py (a stand-in for Packer 1.14 + plugin that only ever fails)
(Packer 1.14 and the plugin cannot be installed here; everything else is real)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

import pytest

from osimage.backends.libvirt import clean as libvirt_clean
from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt import preflight
from osimage.backends.libvirt import streams as libvirt_streams
from osimage.backends.libvirt.streams import ensure_source_volume
from osimage.errors import BuildError, ConfigError
from tests import libvirtd
from tests.conftest import PROJECT, build_py

pytestmark = pytest.mark.libvirt
URI = libvirtd.URI
FAKE_PACKER = PROJECT / "tests" / "fake_packer_libvirt.py"


@pytest.fixture(scope="session")
def libvirt_uri() -> Iterator[str]:
    reason = libvirtd.ensure_libvirtd(URI)
    if reason is not None:
        if os.environ.get("CI"):  # CI runs as root and must run every test
            pytest.fail(f"libvirtd: {reason}")
        pytest.skip(f"libvirtd: {reason}")
    yield URI
    libvirtd.stop_started()


@pytest.fixture
def pool(tmp_path: Path, libvirt_uri: str) -> Iterator[libvirtd.TestPool]:
    with libvirtd.TestPool(libvirt_uri, tmp_path / "pool") as p:
        yield p


@pytest.fixture
def ssh_uri(tmp_path: Path, libvirt_uri: str) -> Iterator[str]:
    """qemu+ssh:// to the same libvirtd, through an sshd of the test's own."""
    with libvirtd.SSHHypervisor(tmp_path / "sshd") as remote:
        yield remote.uri


@pytest.fixture
def network(libvirt_uri: str) -> Iterator[libvirtd.TestNetwork]:
    with libvirtd.TestNetwork(libvirt_uri) as n:
        yield n


def binary(path: Path) -> Any:
    return partial(path.open, "rb")


def request(pool: libvirtd.TestPool, network: str | None = None, bridge: str | None = None,
            need: int = 1 << 20, uri: str = URI) -> preflight.PreflightRequest:
    return preflight.PreflightRequest(uri=uri, pool=pool.name, network=network, bridge=bridge,
                               need_bytes=need)


def checks_by_name(req: preflight.PreflightRequest) -> dict[str, preflight.Check]:
    checks, conn = preflight.check_hypervisor(req)
    if conn is not None:
        conn.close()
    return {c.name: c for c in checks}


# --- preflight -------------------------------------------------------------------------------


def test_preflight_passes(pool: libvirtd.TestPool, network: libvirtd.TestNetwork) -> None:
    checks = checks_by_name(request(pool, network=network.name))
    assert [(c.name, c.ok) for c in checks.values()] == [
        ("connect", True), ("storage pool", True), ("free space in pool", True),
        ("network", True)]
    assert "libvirt 9." in checks["connect"].detail or "libvirt" in checks["connect"].detail


def test_preflight_over_ssh(pool: libvirtd.TestPool, network: libvirtd.TestNetwork,
                            ssh_uri: str) -> None:
    checks = checks_by_name(request(pool, network=network.name, uri=ssh_uri))
    assert all(c.ok for c in checks.values()), checks
    assert checks["connect"].detail.startswith("qemu+ssh://root@127.0.0.1:")


def test_preflight_bridge(pool: libvirtd.TestPool, network: libvirtd.TestNetwork) -> None:
    assert checks_by_name(request(pool, bridge=network.bridge))["network"].ok
    missing = checks_by_name(request(pool, bridge="nosuchbr0"))["network"]
    assert not missing.ok and missing.key == "libvirt.bridge"
    assert "iface-list" in missing.hint


def test_preflight_cannot_connect(pool: libvirtd.TestPool) -> None:
    uri = "qemu+ssh://root@127.0.0.1:1/system?no_tty=1"
    checks = list(checks_by_name(request(pool, uri=uri)).values())
    assert [(c.name, c.ok) for c in checks] == [("connect", False)]
    assert "without a password" in checks[0].hint and checks[0].key == "libvirt.uri"


def test_preflight_missing_pool_and_network(pool: libvirtd.TestPool) -> None:
    req = preflight.PreflightRequest(uri=URI, pool="osimage-no-such-pool", network="no-such-net",
                              bridge=None, need_bytes=1)
    checks = checks_by_name(req)
    assert not checks["storage pool"].ok
    assert "pool-define-as osimage-no-such-pool dir" in checks["storage pool"].hint
    assert not checks["network"].ok and "net-list --all" in checks["network"].hint
    with pytest.raises(ConfigError) as info:
        preflight.raise_failed(list(checks.values()), "site.yaml")
    e = info.value
    assert e.exit_code == 2
    assert e.message == ("site.yaml: libvirt.pool: preflight check 'storage pool' failed: "
                         "storage pool 'osimage-no-such-pool' does not exist (and 1 more "
                         "failed check)")
    assert e.hint is not None and "hint: virsh -c qemu:///system net-list --all" in e.hint


def test_preflight_inactive_pool_and_network(tmp_path: Path, libvirt_uri: str) -> None:
    conn = lv.connect(libvirt_uri)
    name = libvirtd.unique("osimage-t-")
    (tmp_path / "p").mkdir()
    p = conn.storagePoolDefineXML(f"<pool type='dir'><name>{name}</name><target><path>"
                                  f"{tmp_path / 'p'}</path></target></pool>", 0)
    n = conn.networkDefineXML(f"<network><name>{name}</name></network>")
    try:
        req = preflight.PreflightRequest(uri=URI, pool=name, network=name, bridge=None,
                                         need_bytes=1)
        checks = checks_by_name(req)
        assert not checks["storage pool"].ok
        assert checks["storage pool"].hint.endswith(f"pool-start {name} && virsh -c "
                                                    f"qemu:///system pool-autostart {name}")
        assert not checks["network"].ok and f"net-start {name}" in checks["network"].hint
    finally:
        p.undefine()
        n.undefine()
        conn.close()


def test_preflight_free_space(pool: libvirtd.TestPool, network: libvirtd.TestNetwork) -> None:
    check = checks_by_name(request(pool, network=network.name, need=1 << 50))["free space in pool"]
    assert not check.ok and "the build needs 1024.0 TiB" in check.detail
    assert "./build.py clean --yes" in check.hint
    # the source counts too until it is in the pool
    src = ("osimage-src-x-0123456789abcdef.iso", 1 << 49, "0" * 64)
    req = preflight.PreflightRequest(uri=URI, pool=pool.name, network=network.name, bridge=None,
                              need_bytes=1 << 20, source=src)
    assert "needs 512.0 TiB" in checks_by_name(req)["free space in pool"].detail


# --- streams ---------------------------------------------------------------------------------


def test_source_upload_round_trip(pool: libvirtd.TestPool, tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) + 12345)
    src = tmp_path / "install.iso"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    name = lv.source_volume_name("t", sha, ".iso")
    got = ensure_source_volume(pool.conn, pool.name, name, "raw", len(data), sha,
                                  binary(src))
    assert got.uploaded and got.size == len(data)
    assert {v.name() for v in pool.pool.listAllVolumes(0)} == {name, name + ".sha256"}
    # present now: the next build skips the upload
    again = ensure_source_volume(pool.conn, pool.name, name, "raw", len(data), sha,
                                    binary(src))
    assert not again.uploaded
    # and back out, byte for byte
    vol = lv.lookup_volume(pool.conn, pool.name, name)
    out = tmp_path / "back.iso"
    back = libvirt_streams.download_stream(pool.conn, vol, out)
    assert back.sha256 == sha and back.size == len(data) and out.read_bytes() == data
    assert not list(tmp_path.glob(".*download"))


def test_streams_over_ssh(pool: libvirtd.TestPool, ssh_uri: str, tmp_path: Path) -> None:
    """A remote hypervisor: the source goes up and the artifact comes down through
    qemu+ssh://, byte for byte; nothing is read from or written to the pool's folder."""
    data = os.urandom(3 * (1 << 20) + 777)
    src = tmp_path / "install.iso"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with lv.connection(ssh_uri) as conn:
        got = ensure_source_volume(conn, pool.name, "remote.iso", "raw", len(data), sha,
                                      binary(src))
        assert got.uploaded
        back = libvirt_streams.download_stream(
            conn, lv.lookup_volume(conn, pool.name, "remote.iso"), tmp_path / "back.iso")
    assert back.sha256 == sha and (tmp_path / "back.iso").read_bytes() == data


def test_upload_without_stamp_is_done_again(pool: libvirtd.TestPool, tmp_path: Path) -> None:
    """A volume whose upload never finished (no stamp: killed, connection lost) is not used."""
    data = os.urandom(300000)
    src = tmp_path / "disk.qcow2"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    name = lv.source_volume_name("t", sha, ".qcow2")
    lv.create_volume(pool.conn, pool.name, name, len(data), "raw")  # left empty
    got = ensure_source_volume(pool.conn, pool.name, name, "raw", len(data), sha, binary(src))
    assert got.uploaded
    vol = lv.lookup_volume(pool.conn, pool.name, name)
    assert libvirt_streams.hash_volume(pool.conn, vol, len(data)).sha256 == sha


def test_upload_with_wrong_checksum_leaves_nothing(pool: libvirtd.TestPool,
                                                   tmp_path: Path) -> None:
    src = tmp_path / "install.iso"
    src.write_bytes(b"x" * 100000)
    name = lv.source_volume_name("t", "f" * 64, ".iso")
    with pytest.raises(BuildError, match=r"the image's checksum says f{64}"):
        ensure_source_volume(pool.conn, pool.name, name, "raw", 100000, "f" * 64,
                                binary(src))
    assert pool.pool.listAllVolumes(0) == []


def test_upload_cut_short_leaves_nothing(pool: libvirtd.TestPool) -> None:
    """An upload that stops half way (here the source fails; Ctrl-C takes the same path)
    removes its volume: a partial source is never left to look complete."""

    class Failing(io.RawIOBase):
        sent = 0

        def read(self, n: int = -1) -> bytes:
            self.sent += n
            if self.sent > 3 << 20:
                raise BuildError("source went away")
            return b"y" * n

    def opener() -> contextlib.AbstractContextManager[IO[bytes]]:
        return contextlib.nullcontext(cast(IO[bytes], Failing()))

    with pytest.raises(BuildError, match="source went away"):
        ensure_source_volume(pool.conn, pool.name, "cut.iso", "raw", 8 << 20, "0" * 64,
                                opener)
    assert pool.pool.listAllVolumes(0) == []


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_upload_from_http_url(pool: libvirtd.TestPool, tmp_path: Path) -> None:
    from osimage.backends.libvirt import steps as libvirt_steps

    data = os.urandom(2 * (1 << 20) + 1)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "boot.iso").write_bytes(data)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/boot.iso"
        size = libvirt_steps._url_size(url)
        sha = hashlib.sha256(data).hexdigest()
        got = ensure_source_volume(pool.conn, pool.name, "src.iso", "raw", size, sha,
                                      partial(libvirt_steps._open_url, url))
    finally:
        server.shutdown()
        server.server_close()
    assert got.uploaded and size == len(data)


def test_sparse_download_keeps_holes(pool: libvirtd.TestPool, tmp_path: Path) -> None:
    size = 64 << 20
    vol = lv.create_volume(pool.conn, pool.name, "sparse.raw", size, "raw")
    # data at a few places of a volume that is holes elsewhere (written on the pool's
    # folder only to make the holes: the code under test reads through the stream)
    with (pool.path / "sparse.raw").open("r+b") as f:
        for offset in (0, 10 << 20, (64 << 20) - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    pool.pool.refresh(0)
    expected = hashlib.sha256((pool.path / "sparse.raw").read_bytes()).hexdigest()
    out = tmp_path / "sparse.raw"
    got = libvirt_streams.download_stream(pool.conn, vol, out, sparse=True)
    assert got.sha256 == expected and got.size == size and out.stat().st_size == size
    assert out.stat().st_blocks * 512 < 8 << 20  # the holes stayed holes
    dense = libvirt_streams.download_stream(pool.conn, vol, tmp_path / "dense.raw", sparse=False)
    assert dense.sha256 == expected


# --- leftovers and clean ---------------------------------------------------------------------


@pytest.fixture
def domains(libvirt_uri: str) -> Iterator[list[str]]:
    """Names of domains a test defines; whatever is left of them is removed after it."""
    names: list[str] = []
    yield names
    with lv.connection(libvirt_uri) as conn:
        for name in names:
            libvirt_clean.remove_domain(conn, name)


def leftover_domain(pool: libvirtd.TestPool, prefix: str, volumes: list[str],
                    domains: list[str]) -> libvirt_clean.BuildTag:
    """What a failed osimage build leaves: its record, its volumes, its domain with its tag."""
    tag = libvirt_clean.BuildTag(run=str(uuid.uuid4()), image="t", pool=pool.name,
                                 domain=prefix + "dom", volumes=tuple(volumes))
    libvirt_clean.write_record(pool.conn, tag)
    for v in volumes:
        lv.create_volume(pool.conn, pool.name, v, 1 << 20, "raw")
    domains.append(prefix + "dom")
    libvirtd.define_domain(pool.conn, prefix + "dom", pool.name, volumes[:1])
    assert libvirt_clean.tag_domain(pool.conn, tag)
    return tag


def test_find_leftovers_with_ages(pool: libvirtd.TestPool, domains: list[str]) -> None:
    prefix = libvirtd.unique("packer-t") + "-"
    leftover_domain(pool, prefix, [f"{prefix}dom-artifact.qcow2", f"{prefix}dom-oemdrv.iso"],
                    domains)
    lv.create_volume(pool.conn, pool.name, "osimage-src-keep.iso", 1024, "raw")
    later = time.time() + 3 * 3600
    found = {i.label: i for i in libvirt_clean.find_leftovers(pool.conn, prefix, now=later)}
    assert set(found) == {f"{prefix}dom", f"{pool.name}/{prefix}dom-artifact.qcow2",
                          f"{pool.name}/{prefix}dom-oemdrv.iso"}
    dom = found[f"{prefix}dom"]
    assert dom.kind == "domain" and dom.state == "running"
    assert dom.age is not None and 3 * 3600 - 60 < dom.age < 3 * 3600 + 60
    rows = libvirt_clean.plan(list(found.values()), older_than=2 * 3600)
    assert {r.action for r in rows} == {"remove"}
    young = libvirt_clean.plan(libvirt_clean.find_leftovers(pool.conn, prefix), 2 * 3600)
    assert {r.action for r in young} == {"keep (younger than 2.0h)"}


def test_clean_command(pool: libvirtd.TestPool, repo: Path, domains: list[str]) -> None:
    prefix = libvirtd.unique("packer-t") + "-"
    names = [f"{prefix}dom-artifact.qcow2", f"{prefix}dom-disk2.raw"]
    leftover_domain(pool, prefix, names, domains)
    args = ["clean", "--uri", URI, "--prefix", prefix]
    dry = build_py(repo, *args, "--older-than", "0")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 3 of 3 would be removed; run again with --yes" in dry.stdout
    assert f"domain  {prefix}dom" in dry.stdout and "running" in dry.stdout
    kept = build_py(repo, *args, "--yes")  # default --older-than 2h: all of it is younger
    assert "removed 0 of 3" in kept.stdout and "keep (younger than 2.0h)" in kept.stdout
    assert pool.conn.lookupByName(f"{prefix}dom").isActive()
    done = build_py(repo, *args, "--older-than", "0", "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed 3 of 3" in done.stdout
    assert not [d for d in pool.conn.listAllDomains(0) if d.name().startswith(prefix)]
    assert not [v for v in pool.pool.listAllVolumes(0) if v.name().startswith(prefix)]
    assert "no packer-t" in build_py(repo, *args).stdout


def test_clean_without_hypervisor(repo: Path) -> None:
    proc = build_py(repo, "clean")
    assert proc.returncode == 2
    assert "no libvirt.uri; give --uri URI" in proc.stderr
    proc = build_py(repo, "clean", "--older-than", "soon", "--uri", URI)
    assert proc.returncode == 2 and "--older-than: 'soon' is not an age" in proc.stderr


def test_remove_build_takes_only_its_own(pool: libvirtd.TestPool, domains: list[str]) -> None:
    dom = libvirtd.unique("packer-osimage-t-")
    tag = leftover_domain(pool, dom, [f"{dom}dom-artifact.qcow2", f"{dom}dom-oemdrv.iso"],
                          domains)
    lv.create_volume(pool.conn, pool.name, f"{dom}other-artifact.qcow2", 1024, "raw")
    removed = libvirt_clean.remove_build(pool.conn, tag)
    assert removed == [f"domain {dom}dom", f"volume {pool.name}/{dom}dom-artifact.qcow2",
                       f"volume {pool.name}/{dom}dom-oemdrv.iso"]
    assert [v.name() for v in pool.pool.listAllVolumes(0)] == [f"{dom}other-artifact.qcow2"]


# --- whole builds ----------------------------------------------------------------------------


def libvirt_site(repo: Path, pool: libvirtd.TestPool, network: libvirtd.TestNetwork,
                 packer: Path | str = FAKE_PACKER) -> Path:
    site = repo / "site.yaml"  # git-ignored
    site.write_text(f"""\
backend: libvirt
packer:
  binary: {packer}
libvirt:
  uri: {URI}
  pool: {pool.name}
  network: {network.name}
  domain_type: qemu
  driver: plugin
""")
    return site


def build_leftovers(pool: libvirtd.TestPool, image: str) -> list[str]:
    prefix = f"packer-osimage-{image}-"
    return ([d.name() for d in pool.conn.listAllDomains(0) if d.name().startswith(prefix)]
            + [v.name() for v in pool.pool.listAllVolumes(0) if v.name().startswith(prefix)])


def test_failed_build_leaves_nothing(repo: Path, pool: libvirtd.TestPool,
                                     network: libvirtd.TestNetwork) -> None:
    libvirt_site(repo, pool, network)
    proc = build_py(repo, "smoke", env={"FAKE_PACKER_MODE": "fail"})
    assert proc.returncode == 1, proc.stderr
    assert "packer build failed: Build 'libvirt.smoke' errored" in proc.stderr
    assert "removed domain packer-osimage-smoke-" in proc.stderr
    assert build_leftovers(pool, "smoke") == []
    assert not (repo / "images" / "smoke" / "manifest.json").exists()
    # --keep-failed keeps them, for a look with virsh; clean removes them later
    kept = build_py(repo, "smoke", "--keep-failed", env={"FAKE_PACKER_MODE": "fail"})
    assert kept.returncode == 1 and "kept domain packer-osimage-smoke-" in kept.stderr
    assert len(build_leftovers(pool, "smoke")) == 3
    done = build_py(repo, "clean", "--older-than", "0", "--yes", "--prefix",
                    "packer-osimage-smoke-")
    assert "removed 3 of 3" in done.stdout, done.stdout + done.stderr
    assert build_leftovers(pool, "smoke") == []


def test_interrupted_build_leaves_nothing(repo: Path, pool: libvirtd.TestPool,
                                          network: libvirtd.TestNetwork) -> None:
    libvirt_site(repo, pool, network)
    env = {**os.environ, "FAKE_PACKER_MODE": "hang", "NO_COLOR": "1"}
    env.pop("OSIMAGE_ROOT", None)
    proc = subprocess.Popen([sys.executable, str(repo / "build.py"), "smoke"], cwd=repo,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [d for d in pool.conn.listAllDomains(0) if d.isActive()
               and d.name().startswith("packer-osimage-smoke-")]:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=40)
    assert proc.returncode == 130, err
    assert "removed domain packer-osimage-smoke-" in err
    assert build_leftovers(pool, "smoke") == []


def test_preflight_fails_with_the_real_packer(repo: Path, pool: libvirtd.TestPool,
                                              network: libvirtd.TestNetwork) -> None:
    """Packer 1.6.6 here cannot run the plugin: the build stops at preflight with exit 2,
    after the hypervisor checks passed, and says what to install."""
    libvirt_site(repo, pool, network, packer="packer")
    proc = build_py(repo, "smoke")
    assert proc.returncode == 2, proc.stderr
    assert "ok storage pool" in proc.stderr and "ok network" in proc.stderr
    assert ("site.yaml: packer.binary: preflight check 'packer version' failed: packer 1.6.6 "
            "is too old for the libvirt plugin (needs 1.7.0 or newer)") in proc.stderr
    assert "install Packer 1.14" in proc.stderr
    assert pool.pool.listAllVolumes(0) == []  # nothing uploaded


def test_preflight_fails_without_the_plugin(repo: Path, pool: libvirtd.TestPool,
                                            network: libvirtd.TestNetwork) -> None:
    libvirt_site(repo, pool, network)
    proc = build_py(repo, "smoke", env={"FAKE_PACKER_MODE": "no-plugin"})
    assert proc.returncode == 2, proc.stderr
    assert ("libvirt.plugin_version: preflight check 'libvirt plugin' failed: "
            "github.com/thomasklein94/libvirt v0.5.0 is not installed") in proc.stderr
    assert "hint: packer plugins install github.com/thomasklein94/libvirt v0.5.0" in proc.stderr
