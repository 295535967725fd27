"""Scheduler evidence: the controller scrapes kube-scheduler and judges scheduling latency and
queue depth (``cluster.scheduler.latency_spike``, ``cluster.scheduler.queue_backlog``).

This is cluster-level evidence, so it belongs in the controller (one or two replicas), not in
the node agents. :mod:`.exposition` reads the page, :mod:`.judge` turns scrapes into
occurrences, :mod:`.scrape` is the bounded HTTP loop. The occurrences (source
``tapio-controller``) go through the same forwarding queue and evidence window as the agents'.
"""

from tapio.controller.scheduler.judge import SchedulerJudge
from tapio.controller.scheduler.scrape import (
    DEFAULT_INTERVAL,
    SchedulerMonitor,
    ScrapeSettings,
    validate_url,
)

__all__ = [
    "DEFAULT_INTERVAL",
    "SchedulerJudge",
    "SchedulerMonitor",
    "ScrapeSettings",
    "validate_url",
]
