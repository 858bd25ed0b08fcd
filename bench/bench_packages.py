"""Benchmark of issue 17, run by hand: python bench/bench_packages.py [--image NAME] [--runs N]

What the package list costs a build (target: under 5 % of it): the image is built with the
package-list step and, on the same source disk, with the step taken out of the feature registry
(a commit of the bench's own copy of the project), each --runs times, alternating. Printed: the
median wall time of both, and of the step itself as the build shows it (in the VM: from the
list-packages provisioner to the end of provisioning, by the build's own timestamps; on the
host: the "list packages" step).

The issue asks for the Debian compute image; without images/debian-compute in the project the
bench measures debian-base and says so.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import git, make_repo  # noqa: E402

STAMP = re.compile(r"^\s*\[\s*([0-9.]+)s\] (.*)$")
HOST_STEP = re.compile(r"ok list packages \(([0-9.]+) s\)")


def build(repo: Path, image: str) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(repo / "build.py"), image, "--no-publish"],
                          cwd=repo, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if k != "OSIMAGE_ROOT"})
    if proc.returncode != 0:
        raise SystemExit(f"./build.py {image} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0, proc.stderr


def step_time(stderr: str) -> tuple[float, float]:
    """(in the VM, on the host): from the upload of the list-packages provisioner's
    environment to the first line after the list's download."""
    stamps = [(float(m[1]), m[2]) for m in map(STAMP.match, stderr.splitlines()) if m]
    start = next(t for t, text in stamps if "list-packages" in text)
    fetched = next(i for i, (_, text) in enumerate(stamps)
                   if text.startswith("Downloading /dev/shm/osimage-packages.txt"))
    end = stamps[fetched + 1][0] if fetched + 1 < len(stamps) else stamps[fetched][0]
    host = HOST_STEP.search(stderr)
    return end - start, float(host[1]) if host else 0.0


def after_boot(took: float, stderr: str) -> float:
    """The build's wall time less the VM's boot (up to Packer's "Connected to SSH!"): under
    TCG on a shared machine the boot varies by more than the step costs."""
    boot = next(float(m[1]) for m in map(STAMP.match, stderr.splitlines())
                if m and "Connected to SSH" in m[2])
    return took - boot


def bump(repo: Path, image: str, why: str) -> None:
    """A new commit, so each build is a new version and is not up to date."""
    marker = repo / "images" / image / "image.yaml"
    marker.write_text(marker.read_text() + f"# bench: {why}\n")
    git(repo, "commit", "-qam", f"bench: {why}")


def set_feature(repo: Path, on: bool) -> None:
    registry = repo / "osimage" / "features" / "registry.py"
    text = registry.read_text()
    line = "    packages.FEATURE,"
    text = text.replace(f"# {line}" if on else line, line if on else f"# {line}")
    registry.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="default: debian-compute if the project has it, else "
                                        "debian-base")
    parser.add_argument("--runs", type=int, default=2, help="builds of each kind (median)")
    args = parser.parse_args()
    image = args.image or ("debian-compute" if (ROOT / "images" / "debian-compute").is_dir()
                           else "debian-base")
    if args.image is None and image != "debian-compute":
        print("images/debian-compute is not in this project: measuring debian-base")
    with tempfile.TemporaryDirectory(prefix="osimage-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        build(repo, image)  # warm: makes the source disk (and its parent's, for a layer)
        with_step: list[float] = []
        without: list[float] = []
        booted: dict[bool, list[float]] = {True: [], False: []}
        in_vm: list[float] = []
        host: list[float] = []
        for run in range(args.runs):
            set_feature(repo, True)
            bump(repo, image, f"with the package list, run {run}")
            took, stderr = build(repo, image)
            with_step.append(took)
            booted[True].append(after_boot(took, stderr))
            vm, on_host = step_time(stderr)
            in_vm.append(vm)
            host.append(on_host)
            set_feature(repo, False)
            bump(repo, image, f"without the package list, run {run}")
            took, stderr = build(repo, image)
            assert "list packages" not in stderr
            without.append(took)
            booted[False].append(after_boot(took, stderr))
        w, wo = statistics.median(with_step), statistics.median(without)
        step = statistics.median(in_vm) + statistics.median(host)
        print(f"{image}: build with the package list {w:6.1f} s, without {wo:6.1f} s "
              f"(median of {args.runs}; all: {with_step} / {without})")
        print(f"the step: {statistics.median(in_vm):.2f} s in the VM + "
              f"{statistics.median(host):.2f} s on the host = {step:.2f} s, "
              f"{100 * step / wo:.1f} % of the build without it (target under 5 %)")
        print(f"difference of the medians: {w - wo:+.1f} s ({100 * (w - wo) / wo:+.1f} %)")
        bw, bwo = statistics.median(booted[True]), statistics.median(booted[False])
        print(f"after the boot (Connected to SSH! to the end): with {bw:.1f} s, without "
              f"{bwo:.1f} s, difference {bw - bwo:+.1f} s (all: {booted[True]} / "
              f"{booted[False]})")


if __name__ == "__main__":
    main()
