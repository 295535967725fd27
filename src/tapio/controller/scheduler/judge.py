"""The scheduler judges: scrapes in, cluster occurrences out, once per incident.

``cluster.scheduler.latency_spike`` (one per ``result``): the p99 of
``scheduler_scheduling_attempt_duration_seconds`` over the window, from the *difference* of the
cumulative buckets between the newest scrape and the newest one at least a window older. Lifetime
totals would hide a spike behind weeks of fast attempts; deltas see only the last minute. Until a
window has been observed nothing is judged, and with fewer than ``min_attempts`` attempts in the
window the condition counts as clear (an idle scheduler is not a slow one). A counter that went
backwards (the scheduler restarted) restarts the window.

``cluster.scheduler.queue_backlog`` (one per queue): ``scheduler_pending_pods`` at or above the
threshold in every scrape for ``sustain_seconds``. A failed scrape neither holds nor breaks the
run; a value below the threshold breaks it.

Both are edge-triggered with the same hysteresis as the node anomalies
(:class:`tapio.hysteresis.Hysteresis`): one occurrence when the condition starts, none while it
lasts, and it re-arms only once the value fell below ``threshold × hysteresis_pct / 100``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from tapio.controller.forward.record import ForwardedError, ForwardedOccurrence, rfc3339_nanos
from tapio.controller.scheduler.exposition import Snapshot, quantile
from tapio.hysteresis import Hysteresis, Transition, above
from tapio.occurrence import (
    CONTROLLER_SOURCE,
    SCHEDULER_LATENCY_SPIKE,
    SCHEDULER_QUEUE_BACKLOG,
    Severity,
    new_ulid,
)
from tapio.profile import SchedulerThresholds

OBSERVER: Final = "scheduler"
AGENT_ID: Final = "tapio-controller"
#: Scrapes kept for the window (a 1 s interval over the longest window, 3600 s, fits).
MAX_HISTORY: Final = 4096
#: Distinct results/queues judged (label values come from the scraped page).
MAX_KEYS: Final = 16


@dataclass(slots=True)
class _Backlog:
    over_since: float | None = None
    edge: Hysteresis = field(default_factory=Hysteresis)


def occurrence(
    type_: str,
    severity: Severity,
    code: str,
    message: str,
    data: dict[str, Any],
    now_ns: int,
) -> ForwardedOccurrence:
    """A controller-made occurrence, shaped like the agents' forwarded ones."""
    return ForwardedOccurrence(
        id=new_ulid(now_ns // 1_000_000),
        timestamp=rfc3339_nanos(now_ns),
        timestamp_unix_nanos=now_ns,
        source=CONTROLLER_SOURCE,
        type=type_,
        severity=severity,
        outcome="in_progress",
        observer=OBSERVER,
        node_name="",
        agent_id=AGENT_ID,
        data=dict(sorted(data.items())),
        error=ForwardedError(code=code, message=message),
    )


class SchedulerJudge:
    """Keeps the scrapes of one window and the edge state of every condition."""

    def __init__(self) -> None:
        self.history: deque[Snapshot] = deque(maxlen=MAX_HISTORY)
        self.latency: dict[str, Hysteresis] = {}
        self.backlog: dict[str, _Backlog] = {}

    def reset(self) -> None:
        """Forget everything (the scheduler restarted or the thresholds changed)."""
        self.history.clear()
        self.latency.clear()
        self.backlog.clear()

    def step(
        self, snap: Snapshot, t: SchedulerThresholds, now_ns: int | None = None
    ) -> list[ForwardedOccurrence]:
        """Judge one successful scrape; the occurrences of the conditions that started."""
        if not t.enabled:
            return []
        now = time.time_ns() if now_ns is None else now_ns
        out = self._latency(snap, t, now)
        out += self._backlog(snap, t, now)
        return out

    # -- latency -------------------------------------------------------------------------------

    def _base(self, snap: Snapshot, window: float) -> Snapshot | None:
        """The newest earlier scrape at least ``window`` old; older ones are dropped."""
        cutoff = snap.at - window
        while len(self.history) >= 2 and self.history[1].at <= cutoff:
            self.history.popleft()
        base = self.history[0] if self.history and self.history[0].at <= cutoff else None
        return base

    def _latency(self, snap: Snapshot, t: SchedulerThresholds, now: int) -> list[Any]:
        if self.history and _went_backwards(self.history[-1], snap):
            self.history.clear()
        lat = t.latency_spike
        base = self._base(snap, float(t.window_seconds))
        self.history.append(snap)
        if base is None:
            return []
        out = []
        for result, hist in sorted(snap.attempts.items()):
            before = base.attempts.get(result)
            if before is not None and before.bounds != hist.bounds:
                continue  # bucket layout changed: nothing comparable this round
            base_counts = before.counts if before is not None else (0.0,) * len(hist.counts)
            deltas = tuple(c - b for c, b in zip(hist.counts, base_counts, strict=True))
            attempts = deltas[-1]
            edge = self.latency.get(result)
            if edge is None:
                if len(self.latency) >= MAX_KEYS:
                    continue
                edge = self.latency[result] = Hysteresis()
            p99_ms = quantile(0.99, hist.bounds, deltas) * 1000.0
            if attempts < lat.min_attempts:
                starts, clears = False, True
            else:
                starts, clears = above(p99_ms, lat.p99_ms, t.hysteresis_pct)
            if edge.step(starts, clears) is not Transition.START:
                continue
            observed = snap.at - base.at
            rank = 0.99 * attempts
            bucket = next(b for b, d in zip(hist.bounds, deltas, strict=True) if d >= rank)
            data = {
                "result": result,
                "p99_ms": round(p99_ms, 3),
                "threshold_ms": lat.p99_ms,
                "hysteresis_pct": t.hysteresis_pct,
                "attempts": int(attempts),
                "min_attempts": lat.min_attempts,
                "window_seconds": t.window_seconds,
                "observed_seconds": round(observed, 3),
                "p99_bucket_le_ms": bucket * 1000 if bucket != float("inf") else -1,
                "metric": "scheduler_scheduling_attempt_duration_seconds",
            }
            severity: Severity = "critical" if p99_ms >= 4 * lat.p99_ms else "warning"
            out.append(
                occurrence(
                    SCHEDULER_LATENCY_SPIKE,
                    severity,
                    "SCHEDULER_LATENCY_SPIKE",
                    f"kube-scheduler p99 attempt latency ({result}) {p99_ms:.0f}ms over "
                    f"{observed:.0f}s ({int(attempts)} attempts, threshold {lat.p99_ms}ms)",
                    data,
                    now,
                )
            )
        return out

    # -- backlog -------------------------------------------------------------------------------

    def _backlog(self, snap: Snapshot, t: SchedulerThresholds, now: int) -> list[Any]:
        out = []
        bl = t.queue_backlog
        for queue in bl.queues:
            value = snap.pending.get(queue)
            if value is None:
                continue
            st = self.backlog.setdefault(queue, _Backlog())
            if value >= bl.pending_pods:
                if st.over_since is None:
                    st.over_since = snap.at
            else:
                st.over_since = None
            held = snap.at - st.over_since if st.over_since is not None else 0.0
            starts = st.over_since is not None and held >= bl.sustain_seconds
            _, clears = above(value, bl.pending_pods, t.hysteresis_pct)
            if st.edge.step(starts, clears) is not Transition.START:
                continue
            data = {
                "queue": queue,
                "pending_pods": int(value),
                "threshold_pods": bl.pending_pods,
                "hysteresis_pct": t.hysteresis_pct,
                "sustained_seconds": round(held, 3),
                "sustain_seconds": bl.sustain_seconds,
                "window_seconds": t.window_seconds,
                "metric": "scheduler_pending_pods",
            }
            severity: Severity = "critical" if value >= 4 * bl.pending_pods else "warning"
            out.append(
                occurrence(
                    SCHEDULER_QUEUE_BACKLOG,
                    severity,
                    "SCHEDULER_QUEUE_BACKLOG",
                    f"{int(value)} pods pending in the scheduler's {queue} queue for "
                    f"{held:.0f}s (threshold {bl.pending_pods})",
                    data,
                    now,
                )
            )
        return out


def _went_backwards(base: Snapshot, snap: Snapshot) -> bool:
    for result, hist in snap.attempts.items():
        before = base.attempts.get(result)
        if (
            before is not None
            and before.bounds == hist.bounds
            and any(c < b for c, b in zip(hist.counts, before.counts, strict=True))
        ):
            return True
    return False
