"""Shared fixtures: a throwaway clone of the project to build in, and helpers to run build.py.

Each test that builds gets its own git repository (a copy of the project's tracked files,
committed), so dirty-tree checks, manifest.json and the mirror are the test's own. The smoke
source disk is made once per session and copied in, since it is the same bytes every time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM to the test run (a CI timeout, a killed run) ends it like Ctrl-C, so fixtures
    tear down what they started (the network namespace's libvirtd, dnsmasq, servers) instead
    of leaving it running."""
    signal.signal(signal.SIGTERM, _terminated)


# Under pytest-xdist (scripts/test.sh: -n N --dist loadgroup --no-loadscope-reorder) a work
# unit is a file, or a group of files that must share one worker; units start in this order,
# the longest first, so the run does not end with one long file on one worker. Measured with
# --durations=0 (seconds per file under xdist, 2 cores); files not named here come after, by
# name. Every worker must collect the same order: this is a fixed list, not a measurement.
SLOW_FIRST = (
    "test_debian_compute.py",  # its module fixture builds debian-base, then compute: ~6 min
    "debian-base",
    "test_libvirt_native_iso.py",
    "test_uptodate.py",
    "test_exports_repro.py",
    "test_parent.py",
    "machine-libvirtd",
    "test_all_plan.py",
    "test_patches.py",
    "usb",
    "test_manifest_honest.py",
    "test_libvirt_native_phases.py",
    "test_publish_interrupts.py",
    "test_packages.py",
    "test_libvirt_native_build.py",
    "test_parent_oci.py",
    "test_debug.py",
    "test_s3.py",
    "test_libvirt_native_ssh.py",
    "test_build.py",
    "test_exports.py",
    "test_layout.py",
)
# Files that must run on one worker, one after the other: they share a session fixture (made
# once per worker otherwise), or the machine's libvirtd (ensure_libvirtd starts it if it is
# not running and stop_started stops it at the end of the session: no other worker may be
# using or watching it then).
GROUPS = {
    # apart from test_debian_compute (~6 min alone); debian_base_sources is made once for both
    "test_debian_base.py": "debian-base",
    "test_libvirt_render.py": "debian-base",  # debian-base renders from debian_repo too
    "test_libvirt.py": "machine-libvirtd",
    "test_clean_tags.py": "machine-libvirtd",
    # checks that the machine's libvirtd (its pid file) is left alone by its own
    "test_libvirt_native.py": "machine-libvirtd",
    "test_usb_installer.py": "usb",  # the session's usb_live ISO
    "test_libvirt_native_usb.py": "usb",
}


def _unit(item: pytest.Item) -> str:
    name = item.path.name
    return GROUPS.get(name, name)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: each test in the group of its file (loadgroup then keeps a module's tests,
    and its module-scoped fixtures, on one worker), and the slow units first. A serial run
    (no -n) keeps pytest's own order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {unit: i for i, unit in enumerate(SLOW_FIRST)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank.get(_unit(it), len(rank)), _unit(it), order[id(it)]))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(PROJECT), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True, text=True)
    files = [f for f in out.stdout.split("\0") if f and (PROJECT / f).is_file()]
    # A developer's own build records are not part of the project.
    return [f for f in files if not (f.startswith("images/") and f.endswith("/manifest.json"))]


def make_repo(dest: Path) -> Path:
    for rel in tracked_files():
        src = PROJECT / rel
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.email", "test@osimage.invalid")
    git(dest, "config", "user.name", "osimage tests")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "test fixture")
    return dest


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder made by make() once per test run. Under xdist each worker has a session of its
    own: the first worker to ask makes it in the run's shared temp folder while the others
    wait on a file lock, then all use it (read-only: fixtures copy it)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = factory.mktemp(name)
        make(out)
        return out
    from filelock import FileLock

    shared = factory.getbasetemp().parent  # the run's folder, above each worker's own
    out = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.made").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            (shared / f"{name}.made").touch()
    return out


def _make_smoke_source(out: Path) -> None:
    subprocess.run([str(PROJECT / "scripts" / "make-smoke-disk.sh"), str(out)], check=True,
                   capture_output=True)


@pytest.fixture(scope="session")
def smoke_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke source disk, made once by the project's own script."""
    return made_once(tmp_path_factory, "smoke-sources", _make_smoke_source)


@pytest.fixture
def repo(tmp_path: Path, smoke_sources: Path) -> Path:
    """A committed clone of the project with the smoke source disk already prepared."""
    root = make_repo(tmp_path / "repo")
    sources = root / "build" / "sources" / "smoke"
    shutil.copytree(smoke_sources, sources)
    script = root / "scripts" / "make-smoke-disk.sh"
    import hashlib

    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    return root


def build_py(repo: Path, *args: str, timeout: float = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the repo's own ./build.py as a user would; capture what they would see."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("OSIMAGE_ROOT", None)
    return subprocess.run([sys.executable, str(repo / "build.py"), *args], cwd=repo,
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          stdin=subprocess.DEVNULL)


def under_load(seconds: float) -> float:
    """A wall-clock limit of a test, stated for an idle machine, stretched by how many
    runnable processes share each core now (the other xdist workers, other test runs): the
    test still catches a wait many times too long, and does not fail because the CPU was
    shared."""
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * max(1.0, per_core)


def qemu_pids(under: Path | None = None) -> set[int]:
    """Live qemu processes, only those whose command line names a path under `under` if given
    (so tests running side by side do not see each other's VMs). Zombies are already dead."""
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True)
    pids = set()
    for p in out.stdout.split():
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if state != "Z" and (under is None or str(under) in cmdline):
            pids.add(int(p))
    return pids


@pytest.fixture
def no_leftover_qemu(repo: Path) -> Iterator[None]:
    """After the test, no qemu of the test's repository is running."""
    yield
    left = qemu_pids(repo)
    assert not left, f"qemu processes left behind: {left}"


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (for 'nothing changed on disk')."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts}


def make_debian_base_source(out: Path) -> None:
    """images/debian-base's source disk, by its own script (mmdebstrap: needs the Debian
    mirror; the .debs are cached under ~/.cache/osimage)."""
    proc = subprocess.run([str(PROJECT / "scripts" / "make-debian-base-disk.sh"), str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def debian_base_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debian-base source disk, made once per run (shared by the xdist workers)."""
    return made_once(tmp_path_factory, "debian-base-sources", make_debian_base_source)


@pytest.fixture
def debian_repo(repo: Path, debian_base_sources: Path) -> Path:
    """The test repository with the debian-base source disk already prepared (its stamp says
    the script made it, so the build does not run mmdebstrap again)."""
    import hashlib

    sources = repo / "build" / "sources" / "debian-base"
    shutil.copytree(debian_base_sources, sources)
    script = repo / "scripts" / "make-debian-base-disk.sh"
    (sources / ".prepare-stamp").write_text(hashlib.sha256(script.read_bytes()).hexdigest() + "\n")
    return repo
