"""Upload throughput: the project's SSH publisher against scp, to a loopback sshd.

    python bench/bench_upload.py [--size-mib 2048] [--rounds 3] [--dest-dir DIR]

Starts its own sshd and HTTP server on 127.0.0.1 (tests/servers.py), writes a SIZE MiB file,
then per round uploads it with scp under each cipher and with SSHMirror.publish (which hashes
the bytes as it sends them through the ssh client, and then verifies the file over HTTP), and
with SSHMirror.publish as on a host without `ssh` (paramiko's SFTP), in a rotating order. The
publisher's upload time is publish() minus its HTTP verification, so it includes connecting
and authenticating as scp's does. Prints MiB/s per run, the median per method and the ratio
publisher / best scp. The mirror folder defaults to a tmpfs (/dev/shm) when it has room, so
that the disk's writeback does not decide the result; --dest-dir picks another.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from osimage.publish import artifacts
from osimage.publish.sshmirror import SSHMirror
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


@dataclass
class Run:
    mibs: float  # MiB/s
    client_cpu: float  # CPU seconds per GiB on the sending side
    server_cpu: float  # CPU seconds per GiB of sshd (decrypt, sftp-server, write)


def run_scp(ssh: SSHServer, cipher: str, src: Path, size: int) -> Run:
    target = ssh.root / "scp.bin"
    server0 = ssh.sessions_cpu_seconds()
    client0 = _children_cpu()
    start = time.monotonic()
    subprocess.run(["scp", "-q", *ssh.ssh_options(), "-c", cipher, str(src),
                    f"127.0.0.1:{target}"], check=True)
    seconds = time.monotonic() - start
    ssh.wait_sessions_ended()
    assert target.stat().st_size == size
    target.unlink()
    gib = size / 2**30
    return Run(size / MiB / seconds, (_children_cpu() - client0) / gib,
               (ssh.sessions_cpu_seconds() - server0) / gib)


def run_publisher(ssh: SSHServer, http: HTTPServer, art: artifacts.Artifact,
                  round_no: int, sftp_only: bool = False) -> tuple[Run, float, str]:
    """The upload's figures (publish() without its HTTP check), the check's MiB/s, cipher;
    sftp_only: as on a host without the ssh client (paramiko carries the bytes)."""
    sent_cpu: list[float] = []

    def progress(name: str, done: int, total: int) -> None:
        if name == art.name and done == total:
            sent_cpu.append(time.process_time())

    children0 = _children_cpu()  # the ssh client carrying the bytes counts as the sender
    mirror = SSHMirror(ssh.url, http.url, identity_file=ssh.client_key,
                       known_hosts=ssh.known_hosts, progress=progress)
    server0 = ssh.sessions_cpu_seconds()
    client0 = time.process_time()
    start = time.monotonic()
    path = os.environ["PATH"]
    if sftp_only:
        os.environ["PATH"] = "/nonexistent"
    try:
        mirror.publish([art], f"builds/bench/{round_no}")
    finally:
        os.environ["PATH"] = path
    children = _children_cpu() - children0
    seconds = time.monotonic() - start - mirror.stats.verify_seconds
    ssh.wait_sessions_ended()
    assert mirror.stats.bytes_sent >= art.size
    shutil.rmtree(ssh.root / "builds")
    gib = art.size / 2**30
    run = Run(art.size / MiB / seconds, (sent_cpu[0] - client0 + children) / gib,
              (ssh.sessions_cpu_seconds() - server0) / gib)
    how = f"{mirror.stats.channel}, {mirror.stats.cipher}"
    return run, art.size / MiB / mirror.stats.verify_seconds, how


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    results: dict[str, list[Run]] = {f"scp {c}": [] for c in SCP_CIPHERS}
    results["publisher"] = []
    results["publisher, SFTP only"] = []
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
                    if method.startswith("publisher"):
                        run, check, cipher = run_publisher(ssh, http, art, r,
                                                           sftp_only="SFTP" in method)
                        verify.append(check)
                        label = f"{method.split(',')[0]} ({cipher}, sha256 while sending)"
                    else:
                        run = run_scp(ssh, method.split()[1], src, size)
                        label = method
                    results[method].append(run)
                    print(f"round {r + 1}: {label:55} {run.mibs:7.1f} MiB/s   CPU s/GiB: "
                          f"client {run.client_cpu:4.2f}, sshd {run.server_cpu:4.2f}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dest_dir is None:
            shutil.rmtree(dest, ignore_errors=True)
    print()
    medians = {m: statistics.median(r.mibs for r in v) for m, v in results.items()}
    for method, runs in results.items():
        figures = " ".join(f"{r.mibs:6.1f}" for r in runs)
        client = statistics.median(r.client_cpu for r in runs)
        server = statistics.median(r.server_cpu for r in runs)
        print(f"{method:34} MiB/s median {medians[method]:6.1f} best "
              f"{max(r.mibs for r in runs):6.1f} (runs {figures});  CPU s/GiB client "
              f"{client:4.2f} sshd {server:4.2f}")
    print(f"{'publisher HTTP verification':34} MiB/s median {statistics.median(verify):6.1f}")
    best_scp = max((m for m in medians if m.startswith("scp")), key=lambda m: medians[m])
    ratio = medians["publisher"] / medians[best_scp]
    best_ratio = max(r.mibs for r in results["publisher"]) / max(
        r.mibs for m in medians if m.startswith("scp") for r in results[m])
    print()
    for method, median in medians.items():
        if method.startswith("scp"):
            print(f"publisher / {method}: {medians['publisher'] / median:.2f}x by median")
    print(f"publisher / fastest scp ({best_scp}): {ratio:.2f}x by median, {best_ratio:.2f}x "
          f"best run against best run (target >= 0.90x)")
    sftp = medians["publisher, SFTP only"]
    print(f"publisher without an ssh client (paramiko SFTP) / {best_scp}: "
          f"{sftp / medians[best_scp]:.2f}x by median")
    cpu = {m: statistics.median(r.client_cpu + r.server_cpu for r in runs)
           for m, runs in results.items()}
    print(f"CPU s/GiB, client + sshd: publisher {cpu['publisher']:.2f}, {best_scp} "
          f"{cpu[best_scp]:.2f}; with both sides on this machine's {os.cpu_count()} cores, "
          f"the CPU-bound ceiling of the ratio is about {cpu[best_scp] / cpu['publisher']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
