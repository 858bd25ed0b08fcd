"""Benchmark of issue 16.2, run by hand: python bench/bench_uptodate.py [--runs 5]

Wall time of `./build.py smoke` when smoke is up to date (target: under 1 s) against a full
build of it, and their ratio. The repository is a fresh copy of the project; the first build
makes the source disk, so the full build is timed on a second commit that changes smoke.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import git, make_repo  # noqa: E402


def timed(argv: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "OSIMAGE_ROOT"})
    return time.monotonic() - t0, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="up-to-date runs (median shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="osimage-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        build = [sys.executable, str(repo / "build.py"), "smoke"]
        subprocess.run(build, cwd=repo, check=True, capture_output=True)  # warm: source disk
        marker = repo / "images" / "smoke" / "provision" / "marker.sh"
        marker.write_text(marker.read_text() + "\n# bench\n")
        git(repo, "commit", "-qam", "bench: change smoke")
        full, _ = timed(build, repo)
        times = []
        for _ in range(args.runs):
            took, err = timed(build, repo)
            if "is up to date" not in err:
                raise SystemExit(f"not up to date:\n{err}")
            times.append(took)
        up = statistics.median(times)
        print(f"full build of smoke:      {full:7.2f} s")
        print(f"./build.py smoke, up to date: median {up:.3f} s of {args.runs} "
              f"(min {min(times):.3f}, max {max(times):.3f}; target under 1 s)")
        print(f"ratio: {full / up:.0f}x faster")


if __name__ == "__main__":
    main()
