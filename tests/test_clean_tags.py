"""`./build.py clean` removes only what osimage builds made, against a real libvirtd.

Each test makes its own pool and uniquely named domains and volumes, and runs clean either
with a prefix of its own or as a dry run: other tests (and other people's builds) on the same
libvirtd are never touched. The "foreign" domains and volumes are named like osimage's
(packer-osimage-...) but carry no osimage tag.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from osimage.backends.libvirt import clean as libvirt_clean
from osimage.backends.libvirt import hypervisor as lv
from osimage.backends.libvirt.clean import BuildTag
from osimage.backends.libvirt.streams import upload_stream
from tests import libvirtd
from tests.conftest import PROJECT, build_py

pytestmark = pytest.mark.libvirt
URI = libvirtd.URI
FAKE_PACKER = PROJECT / "tests" / "fake_packer_libvirt.py"


@pytest.fixture(scope="module")
def libvirt_uri() -> Iterator[str]:
    reason = libvirtd.ensure_libvirtd(URI)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"libvirtd: {reason}")
        pytest.skip(f"libvirtd: {reason}")
    yield URI
    libvirtd.stop_started()


@pytest.fixture
def pool(tmp_path: Path, libvirt_uri: str) -> Iterator[libvirtd.TestPool]:
    with libvirtd.TestPool(libvirt_uri, tmp_path / "pool") as p:
        yield p


@pytest.fixture
def domains(pool: libvirtd.TestPool) -> Iterator[list[str]]:
    """Names of the domains a test defines; whatever is left of them goes after it."""
    names: list[str] = []
    yield names
    for name in names:
        libvirt_clean.remove_domain(pool.conn, name)


def volume(pool: libvirtd.TestPool, name: str) -> None:
    lv.create_volume(pool.conn, pool.name, name, 1 << 20, "raw")


def osimage_build(pool: libvirtd.TestPool, domain: str, domains: list[str],
                  tag_domain: bool = True) -> BuildTag:
    """What a failed osimage build leaves: its record, its volumes, its domain (tagged)."""
    tag = BuildTag(run=str(uuid.uuid4()), image="smoke", pool=pool.name, domain=domain,
                   volumes=(f"{domain}-oemdrv.iso", f"{domain}-artifact.qcow2"))
    libvirt_clean.write_record(pool.conn, tag)
    for v in tag.volumes:
        volume(pool, v)
    domains.append(domain)
    libvirtd.define_domain(pool.conn, domain, pool.name, list(tag.volumes))
    if tag_domain:
        assert libvirt_clean.tag_domain(pool.conn, tag)
    return tag


def foreign_domain(pool: libvirtd.TestPool, domain: str, domains: list[str]) -> list[str]:
    """A domain and volumes named as osimage names its own, made by someone else."""
    vols = [f"{domain}-artifact.qcow2", f"{domain}-oemdrv.iso"]
    for v in vols:
        volume(pool, v)
    domains.append(domain)
    libvirtd.define_domain(pool.conn, domain, pool.name, vols[:1])
    return vols


def labels(items: list[libvirt_clean.Leftover]) -> set[str]:
    return {i.label for i in items}


def present(pool: libvirtd.TestPool) -> set[str]:
    pool.pool.refresh(0)
    return ({d.name() for d in pool.conn.listAllDomains(0)}
            | {f"{pool.name}/{v.name()}" for v in pool.pool.listAllVolumes(0)})


def test_domain_tag_round_trip(pool: libvirtd.TestPool, domains: list[str]) -> None:
    name = libvirtd.unique("packer-osimage-t-")
    tag = osimage_build(pool, name, domains)
    dom = pool.conn.lookupByName(name)
    assert libvirt_clean.domain_tag(dom) == tag  # live definition (running)
    dom.destroy()
    assert libvirt_clean.domain_tag(dom) == tag  # persistent definition
    # metadata of another namespace, or none, is no tag
    other = libvirtd.unique("packer-osimage-t-")
    domains.append(other)
    odom = libvirtd.define_domain(pool.conn, other, pool.name, [], start=False)
    assert libvirt_clean.domain_tag(odom) is None
    libvirt = lv.libvirt_module()
    odom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                     f"<build run='{tag.run}' domain='{other}'/>", "x",
                     "https://example.invalid/other", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert libvirt_clean.domain_tag(odom) is None


def test_clean_takes_tagged_builds_only(pool: libvirtd.TestPool, domains: list[str],
                                        repo: Path) -> None:
    unique = libvirtd.unique("packer-osimage-t")
    ours = osimage_build(pool, f"{unique}-ours", domains)
    foreign_vols = foreign_domain(pool, f"{unique}-foreign", domains)
    volume(pool, f"{unique}-loose.raw")  # a volume named like ours, of no build
    # Not records of ours: not JSON, and a record naming volumes that are not its domain's
    volume(pool, f"{libvirt_clean.RECORD_PREFIX}{uuid.uuid4()}.json")
    forged = BuildTag(run=str(uuid.uuid4()), image="x", pool=pool.name,
                      domain=f"{unique}-forged", volumes=(f"{unique}-loose.raw",))
    vol = lv.create_volume(pool.conn, pool.name, forged.record_name,
                           len(forged.record_bytes()))
    upload_stream(pool.conn, vol, BytesIO(forged.record_bytes()), len(forged.record_bytes()))
    foreign = {f"{unique}-foreign", f"{unique}-loose.raw", *foreign_vols}
    ours_items = {ours.domain, *(f"{pool.name}/{v}" for v in ours.volumes)}

    # the selection: with the build's prefix, with an empty one, with a foreign one
    assert labels(libvirt_clean.find_leftovers(pool.conn, unique)) == ours_items
    everything = labels(libvirt_clean.find_leftovers(pool.conn, ""))
    assert ours_items <= everything
    assert not {label for label in everything
                if label.removeprefix(pool.name + "/") in foreign}
    assert labels(libvirt_clean.find_leftovers(pool.conn, f"{unique}-foreign")) == set()

    # the command, as a user runs it: a dry run with an empty prefix lists none of them ...
    dry = build_py(repo, "clean", "--uri", URI, "--prefix", "", "--older-than", "0")
    assert dry.returncode == 0, dry.stderr
    assert f"domain  {ours.domain}" in dry.stdout
    for name in foreign:
        assert name not in dry.stdout, dry.stdout
    # ... nor does one for the foreign names, and removing with them removes nothing
    gone = build_py(repo, "clean", "--uri", URI, "--prefix", f"{unique}-foreign",
                    "--older-than", "0", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert f"no {unique}-foreign* domains or volumes of osimage builds" in gone.stdout
    before = present(pool)
    done = build_py(repo, "clean", "--uri", URI, "--prefix", unique, "--older-than", "0",
                    "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed 3 of 3" in done.stdout, done.stdout
    after = present(pool)
    assert before - after == ours_items | {f"{pool.name}/{ours.record_name}"}
    assert {f"{unique}-foreign", *(f"{pool.name}/{v}" for v in foreign_vols),
            f"{pool.name}/{unique}-loose.raw"} <= after


def test_untagged_domain_of_a_record(pool: libvirtd.TestPool, domains: list[str]) -> None:
    """A wrapper killed before it could tag the domain: the record names the domain, and its
    disks are the record's volumes. A domain of that name on other disks is not the build's."""
    name = libvirtd.unique("packer-osimage-t-")
    tag = BuildTag(run=str(uuid.uuid4()), image="smoke", pool=pool.name, domain=name,
                   volumes=(f"{name}-artifact.qcow2",))
    libvirt_clean.write_record(pool.conn, tag)
    volume(pool, f"{name}-artifact.qcow2")
    volume(pool, "someone-elses-disk.raw")
    domains.append(name)
    dom = libvirtd.define_domain(pool.conn, name, pool.name, ["someone-elses-disk.raw"],
                                 start=False)
    assert labels(libvirt_clean.find_leftovers(pool.conn, name)) == {
        f"{pool.name}/{name}-artifact.qcow2"}
    dom.undefine()
    libvirtd.define_domain(pool.conn, name, pool.name, [f"{name}-artifact.qcow2"], start=False)
    assert labels(libvirt_clean.find_leftovers(pool.conn, name)) == {
        name, f"{pool.name}/{name}-artifact.qcow2"}


def test_failed_build_tags_what_it_leaves(repo: Path, pool: libvirtd.TestPool,
                                          domains: list[str]) -> None:
    """A real build (the Packer stand-in fails after the domain is up) with --keep-failed:
    the domain carries the build's tag, the pool its record; clean removes all of it."""
    with libvirtd.TestNetwork(URI) as net:
        (repo / "site.yaml").write_text(
            f"backend: libvirt\npacker:\n  binary: {FAKE_PACKER}\nlibvirt:\n  uri: {URI}\n"
            f"  pool: {pool.name}\n  network: {net.name}\n  domain_type: qemu\n"
            f"  driver: plugin\n")
        proc = build_py(repo, "smoke", "--keep-failed", env={"FAKE_PACKER_MODE": "fail"})
        assert proc.returncode == 1, proc.stderr
        found = re.search(r"osimage-build-([0-9a-f-]{36})\.json: domain (\S+),", proc.stderr)
        assert found, proc.stderr
        run, domain = found.groups()
        domains.append(domain)
        tag = libvirt_clean.domain_tag(pool.conn.lookupByName(domain))
        assert tag is not None and tag.run == run and tag.domain == domain
        assert set(tag.volumes) == {f"{domain}-oemdrv.iso", f"{domain}-artifact.qcow2"}
        done = build_py(repo, "clean", "--uri", URI, "--prefix", domain, "--older-than", "0",
                        "--yes")
        assert "removed 3 of 3" in done.stdout, done.stdout + done.stderr
        assert not {d for d in present(pool) if domain in d}
