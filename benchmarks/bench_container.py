#!/usr/bin/env python3
"""Container observer overhead: ns per fork + exit + wait of a short process.

Runs a C loop (compiled here with gcc, so Python does not dilute the ratio) that forks a child
which exits immediately, and waits for it; with and without the container programs attached
(loaded in-process with ``tapio.bpf.loader.BpfObject`` and a standalone ``TapioConfig``).

Two workloads:
  * exit 0: the common case, filtered in the kernel (target <= 1.10x);
  * exit 1: every process is an abnormal exit and produces a record (worst case), with the
    ring drained by this process meanwhile.

Needs root. Alternates bare/attached runs and reports medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tapio.bpf.abi import FLAG_CONTAINER, TapioConfig
from tapio.bpf.loader import BpfObject, objects_dir
from tapio.bpf.ringbuf import RingBuffer
from tapio.observers.container import CONTAINER_EVENT

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


def run_loop(exe: Path, n: int, code: int) -> float:
    out = subprocess.run([str(exe), str(n), str(code)], check=True, capture_output=True, text=True)
    return float(out.stdout)


def measure(exe: Path, n: int, code: int, rounds: int, scope: int) -> tuple[float, float, int]:
    bare: list[float] = []
    attached: list[float] = []
    records = 0
    cfg = TapioConfig(generation=1, flags=FLAG_CONTAINER, exit_flags=scope)
    for _ in range(rounds):
        bare.append(run_loop(exe, n, code))
        with BpfObject(objects_dir() / "container.bpf.o") as obj:
            obj.map("tapio_config").update(bytes(4), cfg.pack())
            events = obj.map("events")
            ring = RingBuffer.open(events.fd, events.max_entries)
            stop = threading.Event()
            seen = [0]

            def drain(
                ring: RingBuffer = ring, stop: threading.Event = stop, seen: list[int] = seen
            ) -> None:
                while not stop.wait(0.01):
                    seen[0] += ring.consume_fixed(CONTAINER_EVENT.size, 1 << 20).records

            t = threading.Thread(target=drain)
            t.start()
            obj.attach_all()
            try:
                attached.append(run_loop(exe, n, code))
            finally:
                stop.set()
                t.join()
                seen[0] += ring.consume_fixed(CONTAINER_EVENT.size, 1 << 20).records
                ring.close()
            records += seen[0]
    return statistics.median(bare), statistics.median(attached), records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000, help="forks per run")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        run_loop(exe, 500, 0)  # warm up
        rows = []
        for label, code, scope in (
            ("exit 0 (filtered)", 0, 0),
            ("exit 1, scope all (1 record each)", 1, 0),
        ):
            b, a, recs = measure(exe, args.n, code, args.rounds, scope)
            rows.append((label, b, a, a / b, recs))
    print(f"{'workload':44} {'bare ns':>10} {'attached ns':>12} {'ratio':>7} {'records':>8}")
    for label, b, a, r, recs in rows:
        print(f"{label:44} {b:10.0f} {a:12.0f} {r:7.3f} {recs:8d}")
    print(f"(median of {args.rounds} alternating runs, {args.n} fork+exit+wait per run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
