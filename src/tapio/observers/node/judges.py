"""The node's occurrences: what each judged condition reports when it starts.

The observer (:mod:`tapio.observers.node.observer`) owns the edges (one
:class:`~tapio.observers.node.board.Hysteresis` per condition) and calls these builders on a
``START`` transition; each turns one interval's figures into an occurrence. They are pure:
thresholds, generation and time come in as arguments. Which container a cgroup or the worst
waiting task belongs to is added afterwards by the enrichment stage.
"""

from __future__ import annotations

from tapio.observers.base import UserThresholds
from tapio.observers.node.board import Report
from tapio.observers.node.pmu import IntervalSample
from tapio.observers.node.psi import NODE, PsiReading
from tapio.observers.node.runq import RunqTotals, WorstWait, percentile_ns
from tapio.observers.node.throttle import QuotaCgroup, ThrottleDelta
from tapio.occurrence import (
    NODE_CPU_STALL,
    NODE_IPC_DEGRADATION,
    NODE_MEMORY_PRESSURE,
    Occurrence,
    Severity,
    new_occurrence,
)

TICK_SECS = 1.0  # run-queue, throttling and PMU intervals


def cpu_stall(severity: Severity, message: str, data: dict[str, object], now_ns: int) -> Occurrence:
    """Every ``kernel.node.cpu_stall`` (its ``signal`` fact says which condition started)."""
    return new_occurrence(
        NODE_CPU_STALL,
        severity,
        "in_progress",
        timestamp_ns=now_ns,
        code="CPU_STALL",
        message=message,
        data=data,
    )


def target_facts(key: str) -> dict[str, object]:
    """``cgroup``/``scope`` of a PSI source: the node, or a cgroup2 directory."""
    if key == NODE:
        return {"cgroup": NODE, "scope": "node"}
    return {"cgroup": key, "scope": "cgroup", "cgroup_hierarchy": "v2"}


def psi_facts(r: PsiReading) -> dict[str, object]:
    facts: dict[str, object] = {
        "some_avg10": r.some.avg10,
        "some_avg60": r.some.avg60,
        "some_avg300": r.some.avg300,
        "some_total_us": r.some.total_us,
    }
    if r.full is not None:
        facts.update(
            full_avg10=r.full.avg10,
            full_avg60=r.full.avg60,
            full_avg300=r.full.avg300,
            full_total_us=r.full.total_us,
        )
    return facts


def psi_occurrence(
    resource: str, rep: Report, u: UserThresholds, generation: int, now_ns: int
) -> Occurrence:
    """Memory pressure or CPU pressure (``signal: "psi"``) of the node or one cgroup."""
    target = "node" if rep.key == NODE else f"cgroup {rep.key}"
    r = rep.reading
    data: dict[str, object] = {
        "config_generation": generation,
        "hysteresis_pct": u.hysteresis_pct,
        "resource": resource,
        **target_facts(rep.key),
        **psi_facts(r),
    }
    if rep.covered:
        data["ancestors_in_pressure"] = list(rep.covered)
    if resource == "memory":
        full = r.full.avg10 if r.full is not None else 0.0
        data.update(threshold_some_pct=u.memory_some_pct, threshold_full_pct=u.memory_full_pct)
        return new_occurrence(
            NODE_MEMORY_PRESSURE,
            "warning",
            "in_progress",
            timestamp_ns=now_ns,
            code="MEMORY_PRESSURE",
            message=(
                f"Memory pressure on {target} "
                f"(some avg10={r.some.avg10:.2f}%, full avg10={full:.2f}%)"
            ),
            data=data,
        )
    data.update(signal="psi", threshold_some_pct=u.cpu_some_pct)
    severity: Severity = "critical" if r.some.avg10 >= min(100.0, 2 * u.cpu_some_pct) else "warning"
    return cpu_stall(
        severity, f"CPU pressure on {target} (some avg10={r.some.avg10:.2f}%)", data, now_ns
    )


def runq_occurrence(
    d: RunqTotals,
    worst: WorstWait | None,
    threshold_ns: int,
    hysteresis_pct: float,
    generation: int,
    now_ns: int,
) -> Occurrence:
    """Run-queue latency (``signal: "runq_latency"``): one interval's waits and its worst."""
    max_ns = worst.max_ns if worst is not None else 0
    p99 = percentile_ns(d.slots, 0.99)
    data: dict[str, object] = {
        "config_generation": generation,
        "signal": "runq_latency",
        "scope": "node",
        "threshold_ms": threshold_ns / 1e6,
        "hysteresis_pct": hysteresis_pct,
        "interval_ms": TICK_SECS * 1000,
        "waits": d.waits,
        "waits_over_threshold": d.over,
        "avg_wait_ms": round(d.wait_ns / d.waits / 1e6, 3) if d.waits else 0.0,
        "p99_wait_ms_upper_bound": round(p99 / 1e6, 3),
        "max_wait_ms": round(max_ns / 1e6, 3),
        "throttled_waits_excluded": d.throttled_waits,
    }
    if worst is not None:
        data.update(
            worst_pid=worst.pid,
            worst_tid=worst.tid,
            worst_comm=worst.comm,
            worst_cpu=worst.cpu,
            worst_cgroup_id=worst.cgroup_id,
        )
    return cpu_stall(
        "critical" if max_ns >= 4 * threshold_ns else "warning",
        (
            f"Run-queue latency max {max_ns / 1e6:.1f}ms "
            f"({d.over} waits ≥ {threshold_ns / 1e6:g}ms in {TICK_SECS:g}s)"
        ),
        data,
        now_ns,
    )


def throttle_occurrence(
    hierarchy: str,
    path: str,
    d: ThrottleDelta,
    q: QuotaCgroup | None,
    u: UserThresholds,
    generation: int,
    now_ns: int,
) -> Occurrence:
    """CFS throttling of one cgroup (``signal: "throttling"``)."""
    data: dict[str, object] = {
        "config_generation": generation,
        "signal": "throttling",
        "scope": "cgroup",
        "cgroup": path,
        "cgroup_hierarchy": "v1" if hierarchy == "cpu" else "v2",
        "threshold_pct": u.throttle_pct,
        "hysteresis_pct": u.hysteresis_pct,
        "throttled_pct": round(d.pct, 2),
        "nr_periods_delta": d.periods,
        "nr_throttled_delta": d.throttled,
        "throttled_ms_delta": round(d.throttled_ns / 1e6, 3),
        "interval_ms": TICK_SECS * 1000,
    }
    if q is not None:
        data.update(quota_us=q.quota_us, period_us=q.period_us)
    return new_occurrence(
        NODE_CPU_STALL,
        "critical" if d.pct >= min(100.0, 2 * u.throttle_pct) else "warning",
        "in_progress",
        timestamp_ns=now_ns,
        code="CPU_STALL",
        message=(f"CPU throttling of cgroup {path}: {d.pct:.0f}% of {d.periods} periods throttled"),
        data=data,
    )


def pmu_facts(sample: IntervalSample, u: UserThresholds, generation: int) -> dict[str, object]:
    data: dict[str, object] = {
        "config_generation": generation,
        "scope": "node",
        "cpus": sample.cpus,
        "cycles": int(sample.cycles),
        "instructions": int(sample.instructions),
        "ipc": round(sample.ipc, 4),
        "interval_ms": TICK_SECS * 1000,
        "hysteresis_pct": u.hysteresis_pct,
    }
    if sample.stall_pct is not None and sample.stall_cycles is not None:
        data.update(stall_cycles=int(sample.stall_cycles), stall_pct=round(sample.stall_pct, 2))
    return data


def ipc_occurrence(
    sample: IntervalSample, u: UserThresholds, generation: int, now_ns: int
) -> Occurrence:
    stall = sample.stall_pct
    return new_occurrence(
        NODE_IPC_DEGRADATION,
        "warning",
        "in_progress",
        timestamp_ns=now_ns,
        code="IPC_DEGRADATION",
        message=f"Node low IPC {sample.ipc:.2f}"
        + (f" (stall {stall:.1f}%)" if stall is not None else ""),
        data={**pmu_facts(sample, u, generation), "threshold_ipc": u.ipc_degradation},
    )


def pmu_stall_occurrence(
    sample: IntervalSample, stall: float, u: UserThresholds, generation: int, now_ns: int
) -> Occurrence:
    """Counter-based CPU stall (``signal: "pmu"``): backend-stalled share of cycles."""
    return cpu_stall(
        "critical" if stall >= u.stall_pct_critical else "warning",
        f"Node CPU stall {stall:.1f}% (ipc={sample.ipc:.2f})",
        {
            **pmu_facts(sample, u, generation),
            "signal": "pmu",
            "threshold_pct": u.stall_pct_warning,
            "critical_pct": u.stall_pct_critical,
        },
        now_ns,
    )
