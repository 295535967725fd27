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

#: The queues of ``scheduler_pending_pods``, as kube-scheduler labels them.
SCHEDULER_QUEUES: tuple[str, ...] = ("active", "backoff", "unschedulable", "gated")
DEFAULT_QUEUES: tuple[str, ...] = ("active", "backoff", "unschedulable")


@dataclass(frozen=True, slots=True)
class SchedulerThresholds:
    """The resolved ``scheduler`` block (profile units: milliseconds, seconds, pods, percent)."""

    enabled: bool = True
    #: Latency is judged over the scrapes of this many seconds (bucket deltas).
    window_seconds: int = 60
    #: A condition clears once its value is below ``threshold × hysteresis_pct / 100``.
    hysteresis_pct: float = 80.0
    #: p99 of ``scheduler_scheduling_attempt_duration_seconds`` (per result) that starts a spike,
    latency_p99_ms: int = 1000
    #: ... with at least this many attempts in the window.
    latency_min_attempts: int = 10
    #: ``scheduler_pending_pods`` of one queue that starts a backlog,
    backlog_pending_pods: int = 50
    #: ... held in every scrape for this many seconds.
    backlog_sustain_seconds: int = 120
    backlog_queues: tuple[str, ...] = DEFAULT_QUEUES
