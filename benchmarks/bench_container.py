#!/usr/bin/env python3
"""Fork + exit + wait of a short process: bare against the default agent (every observer).

A C loop (compiled here with gcc, so Python does not dilute the ratio) forks a child that exits
at once and waits for it. Two workloads: exit 0, the common case, which the container program
drops in the kernel; and exit 1, an abnormal exit for every process (what the agent then does
with it depends on its exit scope: by default host processes are dropped in the kernel too).
The path also crosses the node observer's scheduler hook (two context switches per fork).

Bare and agent rounds alternate (``pairs.py``): the median of the per-pair ratios with its
spread, the bare figure, the agent's CPU per fork, and each BPF program's runs and ns per fork
from ``bpf_stats`` in one extra round. Target <= 1.05x. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pairs import placements, run_ns, with_default_agent

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int code = atoi(argv[2]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) _exit(code);
        int st;
        waitpid(p, &st, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""


def build(tmp: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("bench_container: needs gcc")
    src = tmp / "fork_loop.c"
    src.write_text(LOOP_C)
    exe = tmp / "fork_loop"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=3000, help="forks per round")
    ap.add_argument("--pairs", type=int, default=15, help="bare/agent pairs per workload")
    ap.add_argument("--placement", action="append", help="split (default) and/or free")
    ap.add_argument("--code", type=int, action="append", help="exit codes (default 0 and 1)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_container: run as root")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build(tmp)
        for placement in placements(args.placement or ["split"]):
            for code in args.code or [0, 1]:
                argv = [str(exe), str(args.n), str(code)]
                with_default_agent(
                    f"fork + exit {code} + wait, {args.n} per round",
                    lambda cpus, argv=argv: run_ns(argv, cpus),
                    tmp,
                    pairs=args.pairs,
                    ops=args.n,
                    target=1.05,
                    placement=placement,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
