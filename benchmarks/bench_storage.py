#!/usr/bin/env python3
"""Storage observer overhead: ns per 4 KiB O_DIRECT read from a loop device on a tmpfs file.

A C loop (compiled here with gcc, so Python does not dilute the ratio) reads 4 KiB blocks with
O_DIRECT from a read-only loop device whose backing file lives on a private tmpfs, so every read
is a real block request (issue + complete) served from memory: the fastest block I/O this host
can do, i.e. the worst case for relative overhead. Runs with and without the storage programs
attached (loaded in-process with ``tapio.bpf.loader.BpfObject`` and a standalone
``TapioConfig``; default thresholds, so requests are correlated but none is reported).
Target <= 1.10x. Needs root. Alternates bare/attached runs and reports medians.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tapio.bpf.abi import FLAG_STORAGE, TapioConfig
from tapio.bpf.loader import BpfObject, objects_dir
from tapio.observers.storage import METRIC_AMBIGUOUS, METRIC_UNMATCHED

READ_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[2]), blocks = atol(argv[3]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    void *buf;
    if (posix_memalign(&buf, 4096, 4096)) return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (pread(fd, buf, 4096, (off_t)((i * 7919) % blocks) * 4096) != 4096) {
            perror("pread");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""

IMAGE = 64 << 20


def build(tmp: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("bench_storage: needs gcc")
    src = tmp / "read_loop.c"
    src.write_text(READ_C)
    exe = tmp / "read_loop"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    return exe


@contextlib.contextmanager
def tmpfs_loop(tmp: Path) -> Iterator[str]:
    mnt = tmp / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tapio-bench", str(mnt)], check=True)
    loop = ""
    try:
        image = mnt / "disk.img"
        with open(image, "wb") as fh:
            for i in range(IMAGE >> 20):
                fh.write(bytes([i & 0xFF]) * (1 << 20))
        loop = subprocess.run(
            ["losetup", "-r", "-f", "--show", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        yield loop
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run_loop(exe: Path, dev: str, n: int) -> float:
    out = subprocess.run(
        [str(exe), dev, str(n), str(IMAGE // 4096)], check=True, capture_output=True, text=True
    )
    return float(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50000, help="reads per run")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cfg = TapioConfig(
        generation=1,
        flags=FLAG_STORAGE,
        slow_io_threshold_ns=50_000_000,
        io_latency_critical_ns=200_000_000,
    )
    bare: list[float] = []
    attached: list[float] = []
    drops = {"ambiguous": 0, "unmatched": 0}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        exe = build(tmp)
        with tmpfs_loop(tmp) as dev:
            run_loop(exe, dev, 5000)  # warm up
            for _ in range(args.rounds):
                bare.append(run_loop(exe, dev, args.n))
                with BpfObject(objects_dir() / "storage.bpf.o") as obj:
                    obj.map("tapio_config").update(bytes(4), cfg.pack())
                    obj.attach_all()
                    attached.append(run_loop(exe, dev, args.n))
                    metrics = obj.map("tapio_metrics")
                    drops["ambiguous"] += metrics.percpu_u64_sum(METRIC_AMBIGUOUS)
                    drops["unmatched"] += metrics.percpu_u64_sum(METRIC_UNMATCHED)
    b, a = statistics.median(bare), statistics.median(attached)
    print(f"{'4 KiB O_DIRECT read, loop on tmpfs':36} {'ns/read':>10}")
    print(f"{'bare':36} {b:10.0f}")
    print(f"{'storage programs attached':36} {a:10.0f}")
    print(f"{'ratio (target <= 1.10)':36} {a / b:10.3f}")
    print(
        f"(median of {args.rounds} alternating runs, {args.n} reads per run; drops counted: {drops})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
