"""Upload throughput: the project's SSH publisher against scp, to a loopback sshd.

    python bench/bench_upload.py [--size-mib 2048] [--rounds 3] [--dest-dir DIR]

Starts its own sshd and HTTP server on 127.0.0.1 (tests/servers.py), writes a SIZE MiB file,
then per round uploads it with scp under each cipher and with SSHMirror.publish (which hashes
the bytes as it sends them, and then verifies the file over HTTP), in a rotating order. The
publisher's upload time is publish() minus its HTTP verification, so it includes connecting
and authenticating as scp's does. Prints MiB/s per run, the median per method and the ratio
publisher / best scp. The mirror folder defaults to a tmpfs (/dev/shm) when it has room, so
that the disk's writeback does not decide the result; --dest-dir picks another.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from osimage import artifacts
from osimage.sshmirror import SSHMirror
from tests.servers import HTTPServer, SSHServer

SCP_CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr")
MiB = 1 << 20


def make_source(path: Path, size: int) -> None:
    block = os.urandom(64 * MiB)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def default_dest(size: int) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * size:
        return Path(tempfile.mkdtemp(prefix="osimage-bench-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="osimage-bench-"))


def run_scp(ssh: SSHServer, cipher: str, src: Path, size: int) -> float:
    target = ssh.root / "scp.bin"
    start = time.monotonic()
    subprocess.run(["scp", "-q", *ssh.ssh_options(), "-c", cipher, str(src),
                    f"127.0.0.1:{target}"], check=True)
    seconds = time.monotonic() - start
    assert target.stat().st_size == size
    target.unlink()
    return size / MiB / seconds


def run_publisher(ssh: SSHServer, http: HTTPServer, art: artifacts.Artifact,
                  round_no: int) -> tuple[float, float, str]:
    mirror = SSHMirror(ssh.url, http.url, identity_file=ssh.client_key,
                       known_hosts=ssh.known_hosts)
    dest = f"builds/bench/{round_no}"
    start = time.monotonic()
    mirror.publish([art], dest)
    seconds = time.monotonic() - start - mirror.stats.verify_seconds
    assert mirror.stats.bytes_sent >= art.size
    shutil.rmtree(ssh.root / "builds")
    verify = art.size / MiB / mirror.stats.verify_seconds
    return art.size / MiB / seconds, verify, mirror.stats.cipher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dest-dir", type=Path, help="the mirror's root (default: a tmpfs)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    dest = args.dest_dir or default_dest(size)
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="osimage-bench-src-"))
    results: dict[str, list[float]] = {f"scp {c}": [] for c in SCP_CIPHERS}
    results["publisher"] = []
    verify: list[float] = []
    try:
        src = work / "bench.img"
        print(f"writing {args.size_mib} MiB to {src} ...", flush=True)
        make_source(src, size)
        art = artifacts.record(src)  # the build's checksum step, not timed
        with SSHServer(root=dest) as ssh, HTTPServer(ssh.root) as http:
            print(f"sshd on 127.0.0.1:{ssh.port}, mirror root {dest}", flush=True)
            methods = [*results]
            for r in range(args.rounds):
                order = methods[r % len(methods):] + methods[:r % len(methods)]
                for method in order:
                    if method == "publisher":
                        mibs, check, cipher = run_publisher(ssh, http, art, r)
                        verify.append(check)
                        label = f"publisher ({cipher}, sha256 while sending)"
                    else:
                        mibs = run_scp(ssh, method.split()[1], src, size)
                        label = method
                    results[method].append(mibs)
                    print(f"round {r + 1}: {label:55} {mibs:7.1f} MiB/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dest_dir is None:
            shutil.rmtree(dest, ignore_errors=True)
    print()
    medians = {m: statistics.median(v) for m, v in results.items()}
    for method, values in results.items():
        runs = " ".join(f"{v:6.1f}" for v in values)
        print(f"{method:40} median {medians[method]:7.1f}  best {max(values):7.1f}  "
              f"runs {runs}")
    print(f"{'publisher HTTP verification':40} median {statistics.median(verify):7.1f} MiB/s")
    best_scp = max((m for m in medians if m.startswith("scp")), key=lambda m: medians[m])
    ratio = medians["publisher"] / medians[best_scp]
    best_ratio = max(results["publisher"]) / max(max(results[m]) for m in medians
                                                 if m.startswith("scp"))
    print(f"\npublisher / {best_scp}: {ratio:.2f}x by median, {best_ratio:.2f}x best against "
          f"best (target >= 0.80x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
