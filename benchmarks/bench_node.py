#!/usr/bin/env python3
"""Scheduler-hook overhead of the node observer's BPF programs.

Workload: two processes ping-pong one byte over a pair of pipes for N round trips (every round
trip is two wakeups and at least two context switches, so it is as sched_wakeup/sched_switch-heavy
as a workload gets). Three ways, alternating, several times: bare (nothing loaded), the default
agent's state (node.bpf.o loaded with the observer's program choice, run-queue sampling off: the
hook is not attached) and opted in (hook attached, threshold set through a TapioConfig). The
table shows the median time per round trip and each ratio to bare (target <= 1.10x), and the
kernel-measured cost per invocation of the attached hook (bpf_stats). ``--object`` measures
another build of node.bpf.o (e.g. the one before a change) the same way.

The ping-pong is a small C program when a C compiler exists (the harshest case: nothing but the
syscalls), else the same loop in Python. Two placements: both processes on one CPU (every round
trip is two real switches) and one process per CPU (every round trip wakes the other CPU from
idle, so switches to and from idle are traced too). Other load on the machine makes the
two-CPU row noisy (a cross-CPU wakeup in a VM is an IPI); the same-CPU row is the stable one.

    sudo .venv/bin/python benchmarks/bench_node.py [--round-trips 200000] [--repeats 5]
        [--object OLD/node.bpf.o] [--same-cpu-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tapio.bpf import libbpf as lb  # noqa: E402
from tapio.bpf.abi import FLAG_NODE, TapioConfig  # noqa: E402
from tapio.bpf.loader import BpfObject  # noqa: E402
from tapio.observers.node import NodeObserver  # noqa: E402

OBJECT = REPO / "src" / "tapio" / "bpf" / "objects" / "node.bpf.o"

PINGPONG_C = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int cpu = argc > 2 ? atoi(argv[2]) : -1, cpu2 = argc > 3 ? atoi(argv[3]) : cpu;
    int a[2], b[2];
    char c = 'x';
    if (pipe(a) || pipe(b)) return 1;
    cpu_set_t s;
    if (cpu >= 0) { CPU_ZERO(&s); CPU_SET(cpu, &s); sched_setaffinity(0, sizeof(s), &s); }
    pid_t pid = fork();
    if (pid == 0) {
        if (cpu2 >= 0) { CPU_ZERO(&s); CPU_SET(cpu2, &s); sched_setaffinity(0, sizeof(s), &s); }
        for (long i = 0; i < n; i++) { if (read(a[0], &c, 1) != 1) _exit(1); if (write(b[1], &c, 1) != 1) _exit(1); }
        _exit(0);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) { if (write(a[1], &c, 1) != 1) return 1; if (read(b[0], &c, 1) != 1) return 1; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    waitpid(pid, NULL, 0);
    printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)));
    return 0;
}
"""

PINGPONG_PY = r"""
import os, sys, time
n = int(sys.argv[1]); cpu = int(sys.argv[2]) if len(sys.argv) > 2 else -1
cpu2 = int(sys.argv[3]) if len(sys.argv) > 3 else cpu
if cpu >= 0: os.sched_setaffinity(0, {cpu})
a = os.pipe(); b = os.pipe()
pid = os.fork()
if pid == 0:
    if cpu2 >= 0: os.sched_setaffinity(0, {cpu2})
    r, w = a[0], b[1]
    for _ in range(n):
        os.write(w, os.read(r, 1))
    os._exit(0)
r, w = b[0], a[1]
t0 = time.perf_counter_ns()
for _ in range(n):
    os.write(w, b"x"); os.read(r, 1)
t1 = time.perf_counter_ns()
os.waitpid(pid, 0)
print(t1 - t0)
"""


def build_pingpong(tmp: Path) -> list[str]:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        script = tmp / "pingpong.py"
        script.write_text(PINGPONG_PY)
        return [sys.executable, str(script)]
    src = tmp / "pingpong.c"
    exe = tmp / "pingpong"
    src.write_text(PINGPONG_C)
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    return [str(exe)]


def run_once(cmd: list[str], n: int, cpus: tuple[int, int]) -> float:
    argv = [*cmd, str(n), str(cpus[0]), str(cpus[1])]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(out.strip()) / n  # ns per round trip


STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def prog_counts(obj: BpfObject, prog: str) -> tuple[int, int] | None:
    """(run_cnt, run_time_ns) of ``prog`` from bpf_stats, None if unavailable."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    try:
        pid = obj.programs[prog].prog_id()
        out = subprocess.run(
            [bpftool, "prog", "show", "id", str(pid), "-j"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError, KeyError):
        return None
    info = json.loads(out)
    return int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0))


def waits_of(raw: bytes) -> int:
    """Run-queue waits counted in a runq_hist lookup (the first field of every CPU's slot)."""
    return sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 232))


def attached_run(obj: BpfObject, prog: str, cfg: TapioConfig) -> Any:
    """Configure and link the hook; the caller destroys the returned link (as the observer
    does when run-queue sampling is switched off)."""
    obj.map("tapio_config").update(bytes(4), cfg.pack())
    program = obj.programs[prog]
    link = lb.check_ptr(lb.lib().bpf_program__attach(program.ptr), f"attach of {prog}")
    time.sleep(0.05)
    return link


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runq-ms", type=int, default=50)
    parser.add_argument(
        "--object", type=Path, default=OBJECT, help="node.bpf.o to measure (e.g. an older build)"
    )
    parser.add_argument("--same-cpu-only", action="store_true", help="skip the two-CPU row")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_node: needs root (loads BPF programs)", file=sys.stderr)
        return 2
    if not args.object.exists():
        print(f"bench_node: {args.object} missing, run build_bpf.py", file=sys.stderr)
        return 2
    # What the agent writes: opted in (threshold set, hook attached), or the default (run-queue
    # sampling off: threshold 0 and the hook loaded but not attached).
    on_cfg = TapioConfig(
        generation=1, flags=FLAG_NODE, runq_latency_threshold_ns=args.runq_ms * 1_000_000
    )
    default_cfg = TapioConfig(generation=1, flags=FLAG_NODE)
    rows = []
    costs: list[float] = []
    stats_before = STATS.read_text().strip() if STATS.exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = build_pingpong(Path(tmp))
        kind = "C" if not cmd[0].endswith("python") and "python" not in cmd[0] else "Python"
        placements: list[tuple[str, tuple[int, int]]] = [("same CPU (0/0)", (0, 0))]
        if len(os.sched_getaffinity(0)) > 1 and not args.same_cpu_only:
            a, b = sorted(os.sched_getaffinity(0))[:2]
            placements.append((f"two CPUs ({a}/{b})", (a, b)))
        # The observer's own program choice: one of the two sched_switch alternatives loads.
        with BpfObject(args.object, programs=NodeObserver.programs) as obj:
            prog = next(n for n in ("node_switch", "node_switch_basic") if n in obj.programs)
            for label, cpu in placements:
                run_once(cmd, args.round_trips // 10, cpu)  # warm-up
                off: list[float] = []
                default: list[float] = []
                on: list[float] = []
                waits = 0
                for _ in range(args.repeats):
                    off.append(run_once(cmd, args.round_trips, cpu))
                    obj.map("tapio_config").update(bytes(4), default_cfg.pack())
                    default.append(run_once(cmd, args.round_trips, cpu))  # loaded, detached
                    before = obj.map("runq_hist").lookup(bytes(4)) or b""
                    link = attached_run(obj, prog, on_cfg)
                    try:
                        on.append(run_once(cmd, args.round_trips, cpu))
                        raw = obj.map("runq_hist").lookup(bytes(4)) or b""
                        if stats_before is not None:
                            # An extra, untimed run with bpf_stats on (it adds its own clock
                            # reads), measured as this run's delta.
                            c0 = prog_counts(obj, prog)
                            STATS.write_text("1")
                            try:
                                run_once(cmd, args.round_trips // 4, cpu)
                            finally:
                                STATS.write_text(stats_before)
                            c1 = prog_counts(obj, prog)
                            if c0 is not None and c1 is not None and c1[0] > c0[0]:
                                costs.append((c1[1] - c0[1]) / (c1[0] - c0[0]))
                    finally:
                        lb.lib().bpf_link__destroy(link)
                    waits += waits_of(raw) - waits_of(before)
                m_off, m_def, m_on = (statistics.median(x) for x in (off, default, on))
                rows.append((label, m_off, m_def, m_on, waits // args.repeats))
    print(
        f"\nnode.bpf.o ({args.object}) scheduler-hook overhead, {kind} pipe ping-pong, "
        f"{args.round_trips} round trips x {args.repeats} (median); program {prog}"
    )
    print(
        f"{'placement':<20} {'bare ns/rt':>10} {'default':>9} {'ratio':>7} "
        f"{'opted in':>9} {'ratio':>7} {'waits/run':>10}"
    )
    for label, m_off, m_def, m_on, waits in rows:
        print(
            f"{label:<20} {m_off:>10.0f} {m_def:>9.0f} {m_def / m_off:>6.3f}x "
            f"{m_on:>9.0f} {m_on / m_off:>6.3f}x {waits:>10}"
        )
    if costs:
        print(
            f"{prog} kernel-measured cost (bpf_stats): median "
            f"{statistics.median(costs):.0f} ns per invocation ({len(costs)} runs)"
        )
    worst_default = max(r[2] / r[1] for r in rows)
    worst_on = max(r[3] / r[1] for r in rows)
    # The target is the default agent's (run-queue sampling is opt-in: a profile that asks for
    # it pays for the hook on every switch, which the opted-in column shows).
    print(
        f"\nworst ratio default (hook detached) {worst_default:.3f}x "
        f"(target <= 1.10x): {'OK' if worst_default <= 1.10 else 'MISSED'}; "
        f"opted in {worst_on:.3f}x (the price of run-queue sampling, no target)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
