"""./build.py write-usb IMAGE DEVICE: write a built image to a USB stick, then read it back.

IMAGE is a file (its sha256 is taken from FILE.sha256 beside it when there is one), or an
image's name: its disk file in release X (--release X, from manifests/manifest.yaml) or its
latest clean build (images/IMAGE/manifest.json; --version V for another), read from the site's
mirror, with the sha256 recorded there.

Before anything is written, DEVICE must be a whole disk (not a partition), large enough, and -
unless --force - removable and not in use (neither it nor a partition of it mounted, used as
swap or held by device-mapper/RAID); the user must type "yes" unless --yes, and without a
terminal to ask on, --yes is required. The image is written in one pass that hashes what it
reads; the device is flushed and its cache dropped, then read back and its sha256 compared with
the image's (and the image's with the recorded one). Refusals exit 2 and write nothing; a
failed write or check exits 1, Ctrl-C 130.

Tests stand a regular file in for the device: OSIMAGE_WRITE_USB_SYSROOT names a folder laid out
like / (sys/class/block/NAME/{removable,size,...}, proc/self/mounts, proc/swaps) that the checks
read instead, and only then may DEVICE be a regular file. For a block device it is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from osimage.errors import BuildError, ConfigError, Interrupted
from osimage.sizes import human

SYSROOT_ENV = "OSIMAGE_WRITE_USB_SYSROOT"
CHUNK = 4 << 20
BLKFLSBUF = 0x1261  # <linux/fs.h>: flush the device's buffer cache


class Refused(ConfigError):
    """DEVICE was not written: it failed a check, or the user did not confirm."""


@dataclass(frozen=True)
class Source:
    path: Path
    size: int
    sha256: str | None  # what the image's record says, when it has one
    label: str


@dataclass(frozen=True)
class Device:
    path: Path  # what the user named
    node: Path  # the node it resolves to (/dev/sdb)
    name: str  # sdb
    size: int
    removable: bool
    in_use: list[str]  # why it is busy: "/dev/sdb1 mounted at /media/x", ...
    model: str
    is_block: bool


# --- the image -------------------------------------------------------------------------------


def _expected_from_sidecar(path: Path) -> str | None:
    from osimage.publish.artifacts import parse_checksum_file

    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return None
    return parse_checksum_file(side.read_text(), path.name)


def resolve_source(root: Callable[[], Path], what: str, release_name: str | None,
                   version: str | None, site_file: Path | None,
                   say: Callable[[str], None]) -> Source:
    path = Path(what)
    if path.is_file():
        if release_name or version:
            raise ConfigError(f"{what} is a file: --release and --version name an image's build")
        return Source(path=path, size=path.stat().st_size, sha256=_expected_from_sidecar(path),
                      label=str(path))
    if "/" in what or what.endswith((".raw", ".img", ".iso")):
        raise ConfigError(f"{what}: no such file")
    return _from_records(root(), what, release_name, version, site_file, say)


def _from_records(root: Path, image: str, release_name: str | None, version: str | None,
                  site_file: Path | None, say: Callable[[str], None]) -> Source:
    from osimage import config
    from osimage.features.payload import cache_dir
    from osimage.publish import download
    from osimage.release import commands as release

    if release_name is not None:
        if version is not None:
            raise ConfigError("give --release or --version, not both")
        entry = release.load(root).image(release_name, image)
        label = f"{image} {entry.version} (release {release_name})"
    else:
        entry = release.entry_from_build(root, image, version)
        label = f"{image} {entry.version}"
    disks = [f for f in entry.files if f.kind is None]
    if len(disks) != 1:
        raise ConfigError(f"{image} {entry.version}: {len(disks)} disk files; name the file "
                          "to write instead")
    disk = disks[0]
    site = config.load_site(root, site_file)
    shown = config.display_path(site.path, root) if site.path is not None else "site.yaml"
    source = download.source_for(site.data, root, shown)
    if not source.is_http:
        # A local mirror's file is read once, hashed while it is written.
        local = Path(source.base) / disk.path
        if not local.is_file():
            raise ConfigError(f"{disk.path}: not on the {source.describe()}")
        return Source(path=local, size=disk.size, sha256=disk.sha256, label=label)
    say(f"fetching {disk.path} from the {source.describe()}")
    fetched = download.fetch(source, disk.path, disk.sha256, disk.size, cache_dir(), say)
    return Source(path=fetched.path, size=disk.size, sha256=disk.sha256,
                  label=f"{label}: {PurePosixPath(disk.path).name}")


# --- the device ------------------------------------------------------------------------------


def _sysroot(is_block: bool) -> tuple[Path, bool]:
    """Where /sys and /proc are read from. The test sysroot stands in only for a regular
    file: a real block device is always judged by the real /sys and /proc, so the variable
    can never make a fixed disk look removable or a mounted one look free."""
    fake = os.environ.get(SYSROOT_ENV)
    return (Path(fake), True) if fake and not is_block else (Path("/"), False)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _users(sysroot: Path, fake: bool, names: set[str]) -> list[str]:
    """Mounts, swaps and holders (device-mapper, RAID) of the named block devices."""

    def name_of(node: str) -> str:  # /dev/disk/by-uuid/... -> sdb1 (the test sysroot: as is)
        return Path(node if fake else os.path.realpath(node)).name

    found: list[str] = []
    for line in _read(sysroot / "proc/self/mounts").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith("/dev/") and name_of(fields[0]) in names:
            where = fields[1].replace("\\040", " ")
            found.append(f"{fields[0]} is mounted at {where}")
    for line in _read(sysroot / "proc/swaps").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].startswith("/dev/") and name_of(fields[0]) in names:
            found.append(f"{fields[0]} is used as swap")
    for name in sorted(names):
        holders = sysroot / "sys/class/block" / name / "holders"
        if holders.is_dir():
            found += [f"/dev/{name} is held by {h.name}" for h in sorted(holders.iterdir())]
    return found


def inspect_device(device: str) -> Device:
    """What the checks need to know about DEVICE (from /sys and /proc, or the test sysroot)."""
    path = Path(device)
    node = Path(os.path.realpath(path))
    try:
        mode = os.stat(node).st_mode
    except FileNotFoundError:
        raise Refused(f"{device}: no such device") from None
    is_block = stat.S_ISBLK(mode)
    sysroot, fake = _sysroot(is_block)
    if not is_block and not (fake and stat.S_ISREG(mode)):
        raise Refused(f"{device} is not a block device")
    name = node.name
    block = sysroot / "sys/class/block" / name
    if not block.is_dir():
        raise Refused(f"{device}: no {name} in /sys/class/block; not a disk the kernel knows")
    if (block / "partition").exists():
        disk = Path(os.path.realpath(block)).parent.name
        raise Refused(f"{device} is a partition of /dev/{disk}: give the whole disk, "
                      f"/dev/{disk}")
    parts = {p.name for p in block.iterdir() if (p / "partition").exists()}
    sectors = _read(block / "size")
    size = int(sectors) * 512 if sectors.isdigit() else 0
    model = " ".join(x for x in (_read(block / "device/vendor"), _read(block / "device/model"))
                     if x)
    return Device(path=path, node=node, name=name, size=size,
                  removable=_read(block / "removable") == "1",
                  in_use=_users(sysroot, fake, {name, *parts}), model=model, is_block=is_block)


def check(dev: Device, source: Source, force: bool) -> list[str]:
    """Refuse what must never be written; return warnings for what --force allowed."""
    if dev.size < source.size:
        raise Refused(f"{dev.path} holds {human(dev.size)}, {source.label} needs "
                      f"{human(source.size)}")
    problems = []
    if not dev.removable:
        problems.append(f"{dev.path} is not a removable disk")
    problems += dev.in_use
    if problems and not force:
        raise Refused(f"{problems[0]}; nothing was written",
                      hint="\n".join([*problems[1:], "unmount it, or pass --force if you are "
                                      "sure (some USB disks report themselves as fixed)"]))
    return problems


def confirm(dev: Device, source: Source, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Refused("no confirmation: there is no terminal to ask on; pass --yes to write "
                      f"{dev.path} without asking")
    import click

    what = f"{dev.path} ({dev.model or 'unknown model'}, {human(dev.size)})"
    answer = click.prompt(f"Write {source.label} ({human(source.size)}) to {what}? Everything "
                          "on it is lost. Type yes", default="", show_default=False,
                          err=True)
    if answer.strip() != "yes":
        raise Refused(f"not confirmed; {dev.path} was not written")


# --- writing and reading back ----------------------------------------------------------------


@contextlib.contextmanager
def _progress(total: int, title: str) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn(f"    {title}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(title, total=total)
        yield lambda n: bar.advance(task, n)


def _drop_cache(fd: int, is_block: bool) -> None:
    """So the read-back comes from the device, not from the page cache."""
    if is_block:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_image(source: Path, size: int, target: Path, is_block: bool, exclusive: bool,
                on_progress: Callable[[int], None]) -> str:
    """Copy size bytes of source to target in one pass, hashing them; flush; return sha256."""
    from osimage.publish.artifacts import ThreadedHasher

    flags = os.O_WRONLY | (os.O_EXCL if exclusive and is_block else 0)
    try:
        fd = os.open(target, flags)
    except OSError as e:
        raise BuildError(f"cannot open {target} for writing: {e.strerror}") from None
    hasher = ThreadedHasher()
    done = 0
    try:
        with source.open("rb", buffering=0) as f:
            while done < size:
                block = f.read(min(CHUNK, size - done))
                if not block:
                    raise BuildError(f"{source} ended after {done} of {size} bytes")
                hasher.update(block)
                view = memoryview(block)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                done += len(block)
                on_progress(len(block))
        os.fsync(fd)
        _drop_cache(fd, is_block)
    except OSError as e:
        raise BuildError(f"writing {target} failed after {human(done)}: {e.strerror}") from None
    finally:
        digest = hasher.hexdigest()
        os.close(fd)
    return digest


def read_back(target: Path, size: int, on_progress: Callable[[int], None]) -> str:
    """sha256 of the first size bytes of target."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    try:
        with target.open("rb", buffering=0) as f:
            while done < size:
                n = f.readinto(view[:min(CHUNK, size - done)])
                if not n:
                    raise BuildError(f"{target} ended after {done} of {size} bytes")
                h.update(view[:n])
                done += n
                on_progress(n)
    except OSError as e:
        raise BuildError(f"reading {target} back failed after {human(done)}: "
                         f"{e.strerror}") from None
    return h.hexdigest()


def run(root: Callable[[], Path], what: str, device: str, release_name: str | None,
        version: str | None, yes: bool, force: bool, site_file: Path | None,
        say: Callable[[str], None], warn: Callable[[str], None]) -> str:
    source = resolve_source(root, what, release_name, version, site_file, say)
    dev = inspect_device(device)
    for problem in check(dev, source, force):
        warn(f"{problem} (--force)")
    confirm(dev, source, yes)
    say(f"writing {source.label} ({human(source.size)}) to {dev.path}"
        f"{f' ({dev.model})' if dev.model else ''}")
    t0 = time.monotonic()
    try:
        with _progress(source.size, "write") as tick:
            written = write_image(source.path, source.size, dev.node, dev.is_block,
                                  exclusive=not force, on_progress=tick)
        os.sync()
        seconds = time.monotonic() - t0
        say(f"wrote {human(source.size)} in {seconds:.1f} s "
            f"({human(source.size / max(seconds, 1e-6))}/s), synced; reading it back")
        with _progress(source.size, "verify") as tick:
            back = read_back(dev.node, source.size, tick)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {dev.path} is only partly written") from None
    if source.sha256 is not None and written != source.sha256:
        raise BuildError(f"{source.path}: sha256 {written} was read, {source.sha256} is "
                         f"recorded: the image is damaged, and so is what {dev.path} holds now")
    if back != written:
        raise BuildError(f"{dev.path} read back with sha256 {back}, {written} was written: "
                         "the stick is faulty or was changed while it was written")
    recorded = " (as recorded)" if source.sha256 is not None else ""
    return (f"{dev.path}: {source.label} written and read back, sha256 {back}{recorded}")
