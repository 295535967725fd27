"""The Evidence Profile's ``scheduler`` block: thresholds of the controller's scheduler judges.

Only the controller reads these (it scrapes kube-scheduler with ``--scheduler-metrics-url``);
they are not part of the compiled config the agents receive, so changing them never changes the
config hash the agents converge on.

Defaults are chosen for a real cluster to live with: a p99 scheduling attempt of one second
over a minute (healthy schedulers answer in milliseconds; a second means plugins, extenders or
the API server are struggling), judged only with at least 10 attempts in the window so one slow
pod cannot fire it, and 50 pods waiting in the active, backoff or unschedulable queue for two
minutes. ``gated`` is not judged by default: pods with scheduling gates wait on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tapio.profile.errors import ProfileError
from tapio.profile.model import QueueBacklog, SchedulerLatencySpike, SchedulerOverrides

#: The queues of ``scheduler_pending_pods``, as kube-scheduler labels them.
SCHEDULER_QUEUES: tuple[str, ...] = ("active", "backoff", "unschedulable", "gated")
DEFAULT_QUEUES: tuple[str, ...] = ("active", "backoff", "unschedulable")


@dataclass(frozen=True, slots=True)
class SchedulerThresholds:
    """The resolved ``scheduler`` block (profile units: milliseconds, seconds, pods, percent)."""

    enabled: bool = True
    window_seconds: int = 60
    #: A condition clears once its value is below ``threshold × hysteresis_pct / 100``.
    hysteresis_pct: float = 80.0
    latency_p99_ms: int = 1000
    latency_min_attempts: int = 10
    backlog_pending_pods: int = 50
    backlog_sustain_seconds: int = 120
    backlog_queues: tuple[str, ...] = DEFAULT_QUEUES


def _int(path: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ProfileError(path, f"value {value} out of range {lo}..={hi}")
    return value


def resolve_scheduler(
    o: SchedulerOverrides | None, base: SchedulerThresholds, p: str
) -> SchedulerThresholds:
    """Validate the block (first error wins, fields in declared order) and merge it over
    ``base``."""
    if o is None:
        return base
    spike = o.latency_spike or SchedulerLatencySpike()
    backlog = o.queue_backlog or QueueBacklog()
    out = {
        "enabled": base.enabled if o.enabled is None else o.enabled,
        "window_seconds": base.window_seconds,
        "hysteresis_pct": base.hysteresis_pct,
        "latency_p99_ms": base.latency_p99_ms,
        "latency_min_attempts": base.latency_min_attempts,
        "backlog_pending_pods": base.backlog_pending_pods,
        "backlog_sustain_seconds": base.backlog_sustain_seconds,
        "backlog_queues": base.backlog_queues,
    }
    if o.window_seconds is not None:
        out["window_seconds"] = _int(f"{p}.window_seconds", o.window_seconds, 10, 3600)
    if o.hysteresis_pct is not None:
        pct = o.hysteresis_pct
        if not math.isfinite(pct) or not 1.0 <= pct <= 100.0:
            raise ProfileError(f"{p}.hysteresis_pct", f"value {pct:g} out of range 1.0..=100.0")
        out["hysteresis_pct"] = pct
    if spike.p99_ms is not None:
        out["latency_p99_ms"] = _int(f"{p}.latency_spike.p99_ms", spike.p99_ms, 1, 600_000)
    if spike.min_attempts is not None:
        out["latency_min_attempts"] = _int(
            f"{p}.latency_spike.min_attempts", spike.min_attempts, 1, 1_000_000
        )
    if backlog.pending_pods is not None:
        out["backlog_pending_pods"] = _int(
            f"{p}.queue_backlog.pending_pods", backlog.pending_pods, 1, 10_000_000
        )
    if backlog.sustain_seconds is not None:
        out["backlog_sustain_seconds"] = _int(
            f"{p}.queue_backlog.sustain_seconds", backlog.sustain_seconds, 0, 86_400
        )
    if backlog.queues is not None:
        if not backlog.queues:
            raise ProfileError(f"{p}.queue_backlog.queues", "at least one queue")
        for i, q in enumerate(backlog.queues):
            if q not in SCHEDULER_QUEUES:
                raise ProfileError(
                    f"{p}.queue_backlog.queues[{i}]",
                    f"unknown queue {q!r}, expected one of {', '.join(SCHEDULER_QUEUES)}",
                )
        out["backlog_queues"] = tuple(dict.fromkeys(backlog.queues))
    return SchedulerThresholds(**out)  # type: ignore[arg-type]
