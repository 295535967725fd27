#!/usr/bin/env python3
"""4 KiB O_DIRECT reads from a loop device on tmpfs: bare against the default agent (every
observer).

A C loop (compiled here with gcc, so Python does not dilute the ratio) reads 4 KiB blocks with
O_DIRECT from a read-only loop device whose backing file lives on a private tmpfs, so every read
is a real block request (issue + complete) served from memory: the fastest block I/O this host
can do, i.e. the worst case for relative overhead. The agent runs with its default thresholds,
so every request is correlated and none is reported.

Bare and agent rounds alternate (``pairs.py``): the median of the per-pair ratios with its
spread, the bare figure, the agent's CPU per read, and each BPF program's runs and ns per read
from ``bpf_stats`` in one extra round. Target <= 1.05x. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pairs import placements, run_ns, with_default_agent

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=20000, help="reads per round")
    ap.add_argument("--pairs", type=int, default=21, help="bare/agent pairs")
    ap.add_argument("--placement", action="append", help="split (default) and/or free")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_storage: run as root")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        exe = build(tmp)
        with tmpfs_loop(tmp) as dev:
            argv = [str(exe), dev, str(args.n), str(IMAGE // 4096)]
            for placement in placements(args.placement or ["split"]):
                with_default_agent(
                    f"4 KiB O_DIRECT read, loop device on tmpfs, {args.n} per round",
                    lambda cpus: run_ns(argv, cpus),
                    tmp,
                    pairs=args.pairs,
                    ops=args.n,
                    target=1.05,
                    placement=placement,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
