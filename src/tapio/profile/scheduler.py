"""The Evidence Profile's ``scheduler`` block: thresholds of the controller's scheduler judges.

Only the controller reads these (it scrapes kube-scheduler with ``--scheduler-metrics-url``);
they are not part of the compiled config the agents receive, so changing them never changes the
config hash the agents converge on. Their profile paths and ranges are declared with every other
threshold's, on :class:`tapio.profile.validate.Resolved`.

Defaults are chosen for a real cluster to live with: a p99 scheduling attempt of one second
over a minute (healthy schedulers answer in milliseconds; a second means plugins, extenders or
the API server are struggling), judged only with at least 10 attempts in the window so one slow
pod cannot fire it, and 50 pods waiting in the active, backoff or unschedulable queue for two
minutes. ``gated`` is not judged by default: pods with scheduling gates wait on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The queues of ``scheduler_pending_pods``, as kube-scheduler labels them.
SCHEDULER_QUEUES: tuple[str, ...] = ("active", "backoff", "unschedulable", "gated")
DEFAULT_QUEUES: tuple[str, ...] = ("active", "backoff", "unschedulable")


@dataclass(frozen=True, slots=True)
class LatencySpikeThresholds:
    """``cluster.scheduler.latency_spike``: the p99 of
    ``scheduler_scheduling_attempt_duration_seconds`` (per result, over the window) that starts
    a spike, judged only with at least ``min_attempts`` attempts in the window."""

    p99_ms: int = 1000
    min_attempts: int = 10


@dataclass(frozen=True, slots=True)
class BacklogThresholds:
    """``cluster.scheduler.queue_backlog``: ``scheduler_pending_pods`` of one of ``queues`` at
    or above ``pending_pods`` in every scrape for ``sustain_seconds``."""

    pending_pods: int = 50
    sustain_seconds: int = 120
    queues: tuple[str, ...] = DEFAULT_QUEUES


_LATENCY: Final = LatencySpikeThresholds()
_BACKLOG: Final = BacklogThresholds()


@dataclass(frozen=True, slots=True)
class SchedulerThresholds:
    """The resolved ``scheduler`` block (profile units: milliseconds, seconds, pods, percent).
    ``window_seconds`` is what latency is judged over (bucket deltas); a condition clears once
    its value is below ``threshold × hysteresis_pct / 100``."""

    enabled: bool = True
    window_seconds: int = 60
    hysteresis_pct: float = 80.0
    latency_spike: LatencySpikeThresholds = _LATENCY
    queue_backlog: BacklogThresholds = _BACKLOG
