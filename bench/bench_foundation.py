"""Benchmarks of issue 3, run by hand: python bench/bench_foundation.py [--runs 3] [--hash-gib 2]

1. wall time of `./build.py smoke` against a raw `packer build` of the same rendered HCL
   (target: at most 1.05x);
2. `./build.py --help` (target: under 0.3 s);
3. hashing a 2 GiB file with osimage.publish.artifacts.hash_file against hashlib alone
   (hashlib.file_digest; target: at least 0.9x its throughput).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from osimage.publish.artifacts import hash_file  # noqa: E402
from tests.conftest import make_repo  # noqa: E402


def timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return time.monotonic() - t0


def bench_build(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="osimage-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        build = [sys.executable, str(repo / "build.py"), "smoke"]
        subprocess.run(build, cwd=repo, check=True, capture_output=True)  # warm: source disk
        work = next(p for p in (repo / "build" / "smoke").glob("g*") if p.is_dir())
        hcl_text = (work / "smoke.pkr.hcl").read_text()
        key_dir = Path(tmp) / "key"
        key_dir.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(key_dir / "id")], check=True)
        hcl_text = re.sub(r"/tmp/osimage-smoke-key-[^/]+/id_ed25519", str(key_dir / "id"),
                          hcl_text)
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()
        (raw_dir / "smoke.pkr.hcl").write_text(
            hcl_text.replace(str(work), str(raw_dir)))
        wrapper: list[float] = []
        raw: list[float] = []
        for _ in range(runs):
            wrapper.append(timed(build, repo))
            shutil.rmtree(raw_dir / "output", ignore_errors=True)
            (raw_dir / "packer-manifest.json").unlink(missing_ok=True)
            raw.append(timed(["packer", "build", "smoke.pkr.hcl"], raw_dir,
                             {"CHECKPOINT_DISABLE": "1"}))
        w, r = statistics.median(wrapper), statistics.median(raw)
        print(f"build: ./build.py smoke median {w:.2f} s {fmt(wrapper)}; raw packer build "
              f"median {r:.2f} s {fmt(raw)}; ratio {w / r:.3f}x (target <= 1.05x)")


def bench_help() -> None:
    times = [timed([sys.executable, str(ROOT / "build.py"), "--help"], ROOT) for _ in range(10)]
    print(f"help: ./build.py --help median {statistics.median(times):.3f} s, "
          f"max {max(times):.3f} s (target < 0.3 s)")


def bench_hash(gib: float) -> None:
    with tempfile.TemporaryDirectory(prefix="osimage-bench-", dir=ROOT / "build"
                                     if (ROOT / "build").is_dir() else None) as tmp:
        path = Path(tmp) / "big.img"
        block = os.urandom(64 << 20)
        with path.open("wb") as f:
            for _ in range(int(gib * 16)):
                f.write(block)
        size = path.stat().st_size
        hash_file(path)  # warm the page cache: both sides read from memory
        base: list[float] = []
        ours: list[float] = []
        for _ in range(3):
            t0 = time.monotonic()
            with path.open("rb") as f:
                want = hashlib.file_digest(f, "sha256").hexdigest()
            base.append(time.monotonic() - t0)
            t0 = time.monotonic()
            _, got = hash_file(path)
            ours.append(time.monotonic() - t0)
            assert got == want
        b = size / min(base) / 2**20
        o = size / min(ours) / 2**20
        print(f"hash: {size / 2**30:.1f} GiB, hashlib.file_digest {b:.0f} MiB/s, "
              f"osimage hash_file {o:.0f} MiB/s, ratio {o / b:.3f}x (target >= 0.9x)")


def fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hash-gib", type=float, default=2.0)
    ap.add_argument("--only", choices=["build", "help", "hash"])
    args = ap.parse_args()
    if args.only in (None, "help"):
        bench_help()
    if args.only in (None, "hash"):
        bench_hash(args.hash_gib)
    if args.only in (None, "build"):
        bench_build(args.runs)


if __name__ == "__main__":
    main()
