"""Alternating bare / agent measurements for the hot-path benchmarks (connect, fork + exit,
4 KiB O_DIRECT read), and the kernel's own per-program cost of the agent's BPF programs.

Why this shape: on a shared 2-vCPU VM the bare figure of one workload moves by more than the
targets (1.05x, 1.10x) between two runs minutes apart, so one bare run against one agent run,
or the median of three of each, says little. Here every agent round sits between two bare
rounds (bare, agent, bare, agent, ..., bare); each pair's ratio is the agent round over the mean
of the bare rounds just before and just after it, which cancels a drift that is slow compared
with one pair; the median of those ratios ignores the pair a burst of other work landed in, and
the quartiles and the extremes are printed with it so a reader can see whether the median means
anything at the target's resolution. The bare median is printed too: the machine's own figure.

Placement. ``split`` pins the workload to one CPU and the agent to the other. On a node the
agent is one process among many and its CPU per occurrence is measured and reported on its own
(``bench_agent.py``); what a hot-path ratio has to show is what the agent adds to the workload's
own path: the BPF programs run in the workload's context, the records they write, the wakeups
charged to the producer. With two vCPUs and no pinning the scheduler decides, round by round,
whether the agent's Python drain shares the workload's CPU, and the ratio then mixes two costs
and swings with the placement; ``free`` (no pinning) is kept to show exactly that.

``bpf_stats`` (``kernel.bpf_stats_enabled``) adds two clock reads to every program run, so the
timed rounds run with it off; one extra, untimed agent round with it on gives each program's
runs per operation and ns per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
CpuSet = frozenset[int] | None


class Placement(NamedTuple):
    name: str
    workload: CpuSet
    agent: CpuSet

    def describe(self) -> str:
        if self.workload is None:
            return f"{self.name} (no pinning)"
        return f"{self.name} (workload on CPU {fmt_cpus(self.workload)}, agent on CPU {fmt_cpus(self.agent)})"


def fmt_cpus(cpus: CpuSet) -> str:
    return ",".join(str(c) for c in sorted(cpus)) if cpus else "any"


def placements(names: Sequence[str]) -> list[Placement]:
    """``split``: workload and agent on different CPUs; ``free``: the scheduler decides."""
    cpus = sorted(os.sched_getaffinity(0))
    out: list[Placement] = []
    for name in names:
        if name == "split" and len(cpus) >= 2:
            out.append(Placement("split", frozenset({cpus[-1]}), frozenset({cpus[0]})))
        elif name == "split":
            print("pairs: one CPU only, 'split' runs as 'free'", flush=True)
            out.append(Placement("free", None, None))
        elif name == "free":
            out.append(Placement("free", None, None))
        else:
            raise SystemExit(f"pairs: unknown placement {name!r} (split, free)")
    return out


def pin(cpus: CpuSet) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and every thread it starts) to ``cpus``."""
    if cpus is None:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def run_ns(argv: list[str], cpus: CpuSet) -> float:
    """Run a C workload that prints ns per operation; pinned to ``cpus`` when given."""
    out = subprocess.run(
        argv, check=True, capture_output=True, text=True, preexec_fn=pin(cpus)
    ).stdout
    return float(out.split()[0])


class Pairs(NamedTuple):
    bare: list[float]  # pairs + 1 rounds, the first and last bare
    agent: list[float]  # pairs rounds, agent[i] between bare[i] and bare[i + 1]

    def ratios(self) -> list[float]:
        return [a / ((self.bare[i] + self.bare[i + 1]) / 2) for i, a in enumerate(self.agent)]

    def ratio(self) -> float:
        return statistics.median(self.ratios())

    def summary(self) -> str:
        r = sorted(self.ratios())
        q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0], r[0], r[0]]
        return (
            f"median {self.ratio():.3f}x  (quartiles {q[0]:.3f}-{q[2]:.3f}, "
            f"min {r[0]:.3f}, max {r[-1]:.3f}, {len(r)} pairs)"
        )


def alternate(workload: Callable[[], float], agent_round: Callable[[], float], pairs: int) -> Pairs:
    """bare, agent, bare, ..., bare: ``pairs`` agent rounds, each between two bare rounds."""
    bare = [workload()]
    agent: list[float] = []
    for _ in range(pairs):
        agent.append(agent_round())
        bare.append(workload())
    return Pairs(bare, agent)


@contextlib.contextmanager
def bpf_stats(enabled: bool) -> Iterator[None]:
    """``kernel.bpf_stats_enabled`` set for the block, restored to what it was afterwards."""
    if not STATS.exists():
        yield
        return
    before = STATS.read_text().strip()
    STATS.write_text("1" if enabled else "0")
    try:
        yield
    finally:
        STATS.write_text(before)


def prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds a file descriptor of (/proc fdinfo)."""
    ids: set[int] = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def prog_stats(pid: int) -> dict[str, tuple[int, int]]:
    """{program name: (run_cnt, run_time_ns)} of the BPF programs process ``pid`` holds."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    ids = prog_ids(pid)
    try:
        out = subprocess.run(
            [bpftool, "-j", "prog", "show"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    found: dict[str, tuple[int, int]] = {}
    for prog in json.loads(out):
        if prog.get("id") not in ids:
            continue
        name = str(prog.get("name", prog.get("id")))
        cnt, ns = found.get(name, (0, 0))
        found[name] = (cnt + int(prog.get("run_cnt", 0)), ns + int(prog.get("run_time_ns", 0)))
    return found


class ProgCost(NamedTuple):
    name: str
    runs_per_op: float
    ns_per_run: float
    ns_per_op: float


def program_costs(
    pid: int, workload: Callable[[], float], ops: int
) -> tuple[list[ProgCost], float]:
    """Run ``workload`` (``ops`` operations) once with bpf_stats on; each program of ``pid``
    that ran, with its runs and ns per operation; and the workload's ns per operation then."""
    with bpf_stats(True):
        before = prog_stats(pid)
        ns = workload()
        after = prog_stats(pid)
    costs = []
    for name, (cnt, run_ns_total) in sorted(after.items()):
        c0, t0 = before.get(name, (0, 0))
        runs, spent = cnt - c0, run_ns_total - t0
        if runs > 0:
            costs.append(ProgCost(name, runs / ops, spent / runs, spent / ops))
    costs.sort(key=lambda c: -c.ns_per_op)
    return costs, ns


def cost_table(costs: list[ProgCost], bare_ns: float) -> list[str]:
    lines = [f"  {'program (bpf_stats)':24} {'runs/op':>8} {'ns/run':>8} {'ns/op':>8}"]
    for c in costs:
        lines.append(f"  {c.name:24} {c.runs_per_op:8.2f} {c.ns_per_run:8.0f} {c.ns_per_op:8.0f}")
    total = sum(c.ns_per_op for c in costs)
    lines.append(
        f"  {'all programs':24} {'':8} {'':8} {total:8.0f}"
        f"  = {total / bare_ns * 100:.1f} % of the bare operation ({bare_ns:.0f} ns)"
    )
    return lines


class HotPath(NamedTuple):
    lines: list[str]
    placement: str
    bare: float  # median ns per operation
    agent: float
    ratio: float  # median of the per-pair ratios
    pairs: Pairs
    costs: list[ProgCost]


def hot_path(
    title: str,
    workload: Callable[[CpuSet], float],
    agent: Callable[[CpuSet], AbstractContextManager[int]],
    *,
    pairs: int,
    ops: int,
    target: float,
    placement: Placement,
    settle: float,
    cpu_seconds: Callable[[int], float],
) -> HotPath:
    """One workload's table: the pairs, the ratio with its spread, the agent's CPU per
    operation (on its own CPU with ``split``), and the per-program costs from an extra round."""
    agent_cpu: list[float] = []

    def agent_round() -> float:
        with agent(placement.agent) as pid:
            time.sleep(settle)
            c0 = cpu_seconds(pid)
            ns = workload(placement.workload)
            agent_cpu.append((cpu_seconds(pid) - c0) / ops * 1e6)
            return ns

    with bpf_stats(False):
        workload(placement.workload)  # warm-up
        result = alternate(lambda: workload(placement.workload), agent_round, pairs)
    with agent(placement.agent) as pid:
        time.sleep(settle)
        costs, _ = program_costs(pid, lambda: workload(placement.workload), ops)
    bare = statistics.median(result.bare)
    with_agent = statistics.median(result.agent)
    ok = "yes" if result.ratio() <= target else "NO"
    lines = [
        f"{title}, {placement.describe()}",
        f"  bare      ns/op: median {bare:10.0f}  (min {min(result.bare):.0f}, max {max(result.bare):.0f})",
        f"  agent     ns/op: median {with_agent:10.0f}  (min {min(result.agent):.0f}, max {max(result.agent):.0f})",
        f"  ratio per pair: {result.summary()}  target <= {target:.2f}x  {ok}",
        f"  agent CPU per op while it ran: median {statistics.median(agent_cpu):.2f} us"
        + (" (on its own CPU)" if placement.agent else ""),
        *cost_table(costs, bare),
    ]
    return HotPath(lines, placement.name, bare, with_agent, result.ratio(), result, costs)


def with_default_agent(
    title: str,
    workload: Callable[[CpuSet], float],
    tmp: Path,
    *,
    pairs: int,
    ops: int,
    target: float,
    placement: Placement,
) -> HotPath:
    """``hot_path`` against the default agent of ``bench_agent.py`` (imported here, not at the
    top: ``bench_agent`` imports this module)."""
    from bench_agent import agent_running, cpu_seconds

    hp = hot_path(
        title,
        workload,
        lambda cpus: agent_running(tmp, cpus),
        pairs=pairs,
        ops=ops,
        target=target,
        placement=placement,
        settle=0.5,
        cpu_seconds=cpu_seconds,
    )
    print("\n".join(hp.lines) + "\n", flush=True)
    return hp
