"""Benchmark of issue 16 (layers), run by hand: python bench/bench_layers.py

Wall time of building debian-base and debian-compute from nothing (the source disk by
mmdebstrap, the base's VM build, the compute layer's VM build) against rebuilding
debian-compute alone after a change to it (the base is up to date and reused), and their ratio.
The repository is a fresh copy of the project; the .deb cache under ~/.cache/osimage is kept
(the Debian mirror is not what is measured), the prepare stamp and the mirror are not.
"""

from __future__ import annotations

import argparse
import os
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
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=7200,
                          env={k: v for k, v in os.environ.items() if k != "OSIMAGE_ROOT"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.monotonic() - t0, proc.stdout + proc.stderr  # plan's table is on stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="osimage-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        build = [sys.executable, str(repo / "build.py")]
        base, _ = timed([*build, "debian-base"], repo)
        compute, _ = timed([*build, "debian-compute"], repo)
        scratch = base + compute
        packages = repo / "images" / "debian-compute" / "ansible" / "vars" / "packages.yml"
        packages.write_text(packages.read_text() + "# bench: a change to the compute layer\n")
        git(repo, "commit", "-qam", "bench: change debian-compute")
        plan_time, plan = timed([*build, "plan", "debian-compute"], repo)
        layer, err = timed([*build, "all", "debian-compute"], repo)
        if "debian-base is up to date" not in err:
            raise SystemExit(f"debian-base was not reused:\n{err[-4000:]}")
        print(f"from nothing: debian-base {base:7.1f} s + debian-compute {compute:7.1f} s "
              f"= {scratch:7.1f} s")
        print(f"plan after a change to debian-compute: {plan_time:.2f} s")
        print("  " + "\n  ".join(line for line in plan.splitlines() if "debian-" in line))
        print(f"./build.py all debian-compute after that change: {layer:7.1f} s "
              "(debian-base up to date, reused)")
        print(f"ratio: {scratch / layer:.2f}x faster than building both from nothing")
        # TCG guests share the machine's cores: the figures move with what else runs
        print("load average (1, 5, 15 min) at the start: "
              f"{' '.join(f'{x:.2f}' for x in load_before)}, at the end: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
