"""Controller self-metrics, in a registry of their own (one per Controller instance).

Separate from the agent's registry so an embedding process or a test can run several
controllers without name collisions. Label sets are closed (route templates, status codes,
fixed result words), so cardinality is bounded whatever clients send.
"""

from __future__ import annotations

from functools import partial
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from tapio.buildinfo import LATENCY_BUCKETS, register_self_metrics

# Same choice as the agent registry: no *_created series (global toggle in prometheus-client).
disable_created_metrics()  # type: ignore[no-untyped-call]


_PREFIX = "tapio_controller_"

_M = TypeVar("_M", Counter, Gauge)


def _metric(kind: type[_M], registry: CollectorRegistry, name: str, doc: str, *labels: str) -> _M:
    """One controller metric: ``tapio_controller_<name>`` in this controller's registry."""
    return kind(_PREFIX + name, doc, labels, registry=registry)


class ControllerMetrics:
    """Every controller metric, as a typed attribute (``tapio_controller_`` + the name given)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        register_self_metrics(self.registry)  # tapio_build_info, process_* (CPU, RSS, fds)
        counter = partial(_metric, Counter, self.registry)
        gauge = partial(_metric, Gauge, self.registry)
        self.requests = counter(
            "requests_total",
            "HTTP requests by route template and status code",
            "route",
            "status",
        )
        self.events_accepted = counter(
            "events_accepted_total",
            "Events in accepted batches",
        )
        self.events_rejected = counter(
            "events_rejected_total",
            "Events in decoded batches that failed validation",
        )
        self.batches = counter(
            "batches_total",
            "Event batches by result",
            "result",
        )
        self.hellos = counter(
            "hellos_total",
            "Registrations by result",
            "result",
        )
        self.heartbeats = counter(
            "heartbeats_total",
            "Heartbeats by result (unknown_agent = told to re-register)",
            "result",
        )
        self.agents_evicted = counter(
            "agents_evicted_total",
            "Stale agents dropped to admit a new one at capacity",
        )
        self.sequence_gaps = counter(
            "sequence_gaps_total",
            "Batch sequence numbers skipped by registered agents",
        )
        self.sequence_regressions = counter(
            "sequence_regressions_total",
            "Duplicate or older batch sequence numbers from registered agents",
        )
        self.config_polls = counter(
            "config_requests_total",
            "Config fetches by result (served or not_modified)",
            "result",
        )
        self.reloads = counter(
            "profile_reloads_total",
            "Profile reload attempts by result",
            "result",
        )
        self.agents = gauge(
            "agents",
            "Registered agents",
        )
        self.stale_agents = gauge(
            "stale_agents",
            "Registered agents considered stale",
        )
        self.unconverged_agents = gauge(
            "unconverged_agents",
            "Registered agents not reporting the active config hash",
        )
        self.config_generation = gauge(
            "config_generation",
            "Generation of the served config",
        )
        self.auth_failures = counter(
            "auth_failures_total",
            "Requests to /v1 refused for a missing or invalid bearer token",
            "reason",
        )
        self.events_refused = counter(
            "events_refused_total",
            "Events in valid batches not accepted (unknown_agent: no hello yet; queue_full: "
            "forwarding queue full, answered 503)",
            "reason",
        )
        self.forward_forwarded = counter(
            "forwarded_total",
            "Occurrences delivered to an output (stored/acknowledged downstream)",
            "output",
        )
        self.forward_retried = counter(
            "forward_retries_total",
            "Occurrence deliveries that failed and are retried",
            "output",
        )
        self.forward_dropped = counter(
            "forward_dropped_total",
            "Occurrences given up for an output, by reason",
            "output",
            "reason",
        )
        self.forward_queued = gauge(
            "forward_queued",
            "Occurrences waiting for (or in flight to) an output",
            "output",
        )
        self.forward_duration = Histogram(
            _PREFIX + "forward_duration_seconds",
            "Duration of one delivery attempt of a chunk to an output (failed attempts included)",
            ["output"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.output_up = gauge(
            "output_up",
            "1 when the output's last connect or delivery succeeded",
            "output",
        )
        self.enrichment = counter(
            "enrichment_total",
            "Kubernetes enrichment lookups by result (hit, unknown pod, no_ids in the occurrence)",
            "result",
        )
        self.k8s_watch_restarts = counter(
            "k8s_watch_restarts_total",
            "Pod watch restarts (gone: 410 relist, error: reconnect with backoff)",
            "reason",
        )
        self.k8s_pods = gauge(
            "k8s_pods",
            "Live pods in the index",
        )
        # -- the cluster view: scheduler scrapes and the evidence window --
        self.scheduler_scrapes = counter(
            "scheduler_scrapes_total",
            "kube-scheduler metrics scrapes by result (ok, connect, timeout, http_status, "
            "too_large, parse, no_metrics, error)",
            "result",
        )
        self.scheduler_up = gauge("scheduler_up", "1 when the last scheduler scrape worked")
        self.scheduler_occurrences = counter(
            "scheduler_occurrences_total", "Scheduler conditions that started, by type", "type"
        )
        self.scheduler_evidence_dropped = counter(
            "scheduler_evidence_dropped_total",
            "Scheduler occurrences given up because the forwarding queue stayed full",
        )
        self.window_events = gauge("evidence_window_events", "Occurrences in the evidence window")
        self.window_bytes = gauge("evidence_window_bytes", "Accounted memory of the window")
        self.window_evicted = counter(
            "evidence_window_evicted_total",
            "Window evictions by bound (count, age, bytes)",
            "reason",
        )
        self.window_duplicates = counter(
            "evidence_window_duplicates_total", "Occurrences not added twice (a re-sent batch)"
        )
