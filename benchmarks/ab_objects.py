#!/usr/bin/env python3
"""Two builds of the BPF objects against each other, in the same run: the default agent with
objects A, then with objects B, then A, ..., every agent round between two bare rounds.

Why: a change to a BPF program is worth what it saves on the workload's path, and on a shared
VM the bare figure moves by more than that saving between two runs minutes apart. Alternating
the two object directories in one run (the order flipping every round) puts both under the same
drift; each agent round's ratio is taken against the mean of the bare rounds either side of it,
as in ``pairs.py``. In every agent round, after the timed part (``bpf_stats`` off), a second,
shorter part runs with ``bpf_stats`` on, giving each program's ns per run for A and for B from
the same rounds.

Workloads: ``connect`` (connect() to a closed loopback port), ``fork0`` / ``fork1`` (fork +
exit 0 / 1 + wait), ``storage`` (4 KiB O_DIRECT reads from a loop device on tmpfs); the same C
loops as bench_agent.py, bench_container.py and bench_storage.py. Workload and agent sit on
different CPUs (``split``). Needs root; run it under the benchmark locks.

    ab_objects.py --a /tmp/before-objects --b src/tapio/bpf/objects --workload connect --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bench_container
import bench_storage
from bench_agent import agent_running, build_connect_loop, closed_port
from pairs import CpuSet, bpf_stats, placements, prog_stats, run_ns


@contextlib.contextmanager
def workload_argv(kind: str, tmp: Path, n: int) -> Iterator[list[str]]:
    """The C loop's argv for ``kind`` (its loop device set up and torn down around it)."""
    if kind == "connect":
        yield [str(build_connect_loop(tmp)), str(closed_port()), str(n)]
    elif kind in ("fork0", "fork1"):
        yield [str(bench_container.build(tmp)), str(n), kind[-1]]
    elif kind == "storage":
        exe = bench_storage.build(tmp)
        with bench_storage.tmpfs_loop(tmp) as dev:
            yield [str(exe), dev, str(n), str(bench_storage.IMAGE // 4096)]
    else:
        raise SystemExit(f"ab_objects: unknown workload {kind!r}")


def costs_of(pid: int, run: Callable[[], float], ops: int) -> dict[str, float]:
    """{program: ns per run} of the agent ``pid`` over one ``run`` with bpf_stats on."""
    with bpf_stats(True):
        before = prog_stats(pid)
        run()
        after = prog_stats(pid)
    out: dict[str, float] = {}
    for name, (cnt, ns) in after.items():
        c0, t0 = before.get(name, (0, 0))
        if cnt - c0 >= ops // 100:
            out[name] = (ns - t0) / (cnt - c0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--a", type=Path, required=True, help="objects directory A (before)")
    ap.add_argument("--b", type=Path, required=True, help="objects directory B (after)")
    ap.add_argument("--workload", default="connect", help="connect, fork0, fork1, storage")
    ap.add_argument("-n", type=int, default=0, help="operations per timed round")
    ap.add_argument("--rounds", type=int, default=4, help="agent rounds per object directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ab_objects: run as root")
    n = args.n or {"connect": 20000, "fork0": 3000, "fork1": 3000}.get(args.workload, 20000)
    placement = placements(["split"])[0]
    dirs = {"A": args.a.resolve(), "B": args.b.resolve()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        with workload_argv(args.workload, tmp, n) as argv:
            short = [*argv]
            short[argv.index(str(n))] = str(max(n // 4, 1))

            def bare() -> float:
                return run_ns(argv, placement.workload)

            def agent_round(label: str) -> tuple[float, dict[str, float]]:
                cpus: CpuSet = placement.agent
                with agent_running(tmp, cpus, ebpf_dir=dirs[label]) as pid:
                    time.sleep(0.5)
                    with bpf_stats(False):
                        ns = run_ns(argv, placement.workload)
                    costs = costs_of(pid, lambda: run_ns(short, placement.workload), n // 4)
                return ns, costs

            bare_ns = [bare()]
            rounds: dict[str, list[tuple[float, float, dict[str, float]]]] = {"A": [], "B": []}
            for i in range(args.rounds):
                for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    ns, costs = agent_round(label)
                    bare_ns.append(bare())
                    ratio = ns / ((bare_ns[-2] + bare_ns[-1]) / 2)
                    rounds[label].append((ns, ratio, costs))
                    print(f"  round {i} {label}: {ns:9.0f} ns/op  {ratio:.3f}x", flush=True)
    print(f"{args.workload}: {n} per round, {placement.describe()}")
    print(f"  A = {dirs['A']}\n  B = {dirs['B']}")
    print(f"  bare: median {statistics.median(bare_ns):.0f} ns/op ({len(bare_ns)} rounds)")
    for label, rs in rounds.items():
        print(
            f"  {label}: median {statistics.median(r[0] for r in rs):.0f} ns/op, "
            f"ratio to the bare rounds either side: median "
            f"{statistics.median(r[1] for r in rs):.3f}x "
            f"(min {min(r[1] for r in rs):.3f}, max {max(r[1] for r in rs):.3f})"
        )
    names = sorted({p for rs in rounds.values() for r in rs for p in r[2]})
    print(f"  {'program (bpf_stats, ns/run)':32} {'A':>8} {'B':>8}")
    for name in names:
        cells = []
        for label in ("A", "B"):
            vals = [r[2][name] for r in rounds[label] if name in r[2]]
            cells.append(f"{statistics.median(vals):8.0f}" if vals else f"{'-':>8}")
        print(f"  {name:32} {cells[0]} {cells[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
