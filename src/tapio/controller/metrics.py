"""Controller self-metrics, in a registry of their own (one per Controller instance).

Separate from the agent's registry so an embedding process or a test can run several
controllers without name collisions. Label sets are closed (route templates, status codes,
fixed result words), so cardinality is bounded whatever clients send.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

# Same choice as the agent registry: no *_created series (global toggle in prometheus-client).
disable_created_metrics()  # type: ignore[no-untyped-call]


class ControllerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tapio_controller_requests_total",
            "HTTP requests by route template and status code",
            ["route", "status"],
            registry=r,
        )
        self.events_accepted = Counter(
            "tapio_controller_events_accepted_total", "Events in accepted batches", registry=r
        )
        self.events_rejected = Counter(
            "tapio_controller_events_rejected_total",
            "Events in decoded batches that failed validation",
            registry=r,
        )
        self.batches = Counter(
            "tapio_controller_batches_total", "Event batches by result", ["result"], registry=r
        )
        self.hellos = Counter(
            "tapio_controller_hellos_total", "Registrations by result", ["result"], registry=r
        )
        self.heartbeats = Counter(
            "tapio_controller_heartbeats_total",
            "Heartbeats by result (unknown_agent = told to re-register)",
            ["result"],
            registry=r,
        )
        self.agents_evicted = Counter(
            "tapio_controller_agents_evicted_total",
            "Stale agents dropped to admit a new one at capacity",
            registry=r,
        )
        self.sequence_gaps = Counter(
            "tapio_controller_sequence_gaps_total",
            "Batch sequence numbers skipped by registered agents",
            registry=r,
        )
        self.sequence_regressions = Counter(
            "tapio_controller_sequence_regressions_total",
            "Duplicate or older batch sequence numbers from registered agents",
            registry=r,
        )
        self.config_polls = Counter(
            "tapio_controller_config_requests_total",
            "Config fetches by result (served or not_modified)",
            ["result"],
            registry=r,
        )
        self.reloads = Counter(
            "tapio_controller_profile_reloads_total",
            "Profile reload attempts by result",
            ["result"],
            registry=r,
        )
        self.agents = Gauge("tapio_controller_agents", "Registered agents", registry=r)
        self.stale_agents = Gauge(
            "tapio_controller_stale_agents", "Registered agents considered stale", registry=r
        )
        self.unconverged_agents = Gauge(
            "tapio_controller_unconverged_agents",
            "Registered agents not reporting the active config hash",
            registry=r,
        )
        self.config_generation = Gauge(
            "tapio_controller_config_generation", "Generation of the served config", registry=r
        )
        self.auth_failures = Counter(
            "tapio_controller_auth_failures_total",
            "Requests to /v1 refused for a missing or invalid bearer token",
            ["reason"],
            registry=r,
        )
        self.events_refused = Counter(
            "tapio_controller_events_refused_total",
            "Events in valid batches not accepted (unknown_agent: no hello yet; queue_full: "
            "forwarding queue full, answered 503)",
            ["reason"],
            registry=r,
        )
        self.forward_forwarded = Counter(
            "tapio_controller_forwarded_total",
            "Occurrences delivered to an output (stored/acknowledged downstream)",
            ["output"],
            registry=r,
        )
        self.forward_retried = Counter(
            "tapio_controller_forward_retries_total",
            "Occurrence deliveries that failed and are retried",
            ["output"],
            registry=r,
        )
        self.forward_dropped = Counter(
            "tapio_controller_forward_dropped_total",
            "Occurrences given up for an output, by reason",
            ["output", "reason"],
            registry=r,
        )
        self.forward_queued = Gauge(
            "tapio_controller_forward_queued",
            "Occurrences waiting for (or in flight to) an output",
            ["output"],
            registry=r,
        )
        self.output_up = Gauge(
            "tapio_controller_output_up",
            "1 when the output's last connect or delivery succeeded",
            ["output"],
            registry=r,
        )
        self.enrichment = Counter(
            "tapio_controller_enrichment_total",
            "Kubernetes enrichment lookups by result (hit, unknown pod, no_ids in the occurrence)",
            ["result"],
            registry=r,
        )
        self.k8s_watch_restarts = Counter(
            "tapio_controller_k8s_watch_restarts_total",
            "Pod watch restarts (gone: 410 relist, error: reconnect with backoff)",
            ["reason"],
            registry=r,
        )
        self.k8s_pods = Gauge("tapio_controller_k8s_pods", "Live pods in the index", registry=r)
        # -- the cluster view: scheduler scrapes and the evidence window --
        self.scheduler_scrapes = Counter(
            "tapio_controller_scheduler_scrapes_total",
            "kube-scheduler metrics scrapes by result (ok, connect, timeout, http_status, "
            "too_large, parse, no_metrics, error)",
            ["result"],
            registry=r,
        )
        self.scheduler_up = Gauge(
            "tapio_controller_scheduler_up", "1 when the last scheduler scrape worked", registry=r
        )
        self.scheduler_occurrences = Counter(
            "tapio_controller_scheduler_occurrences_total",
            "Scheduler conditions that started (occurrences made by the controller)",
            ["type"],
            registry=r,
        )
        self.scheduler_evidence_dropped = Counter(
            "tapio_controller_scheduler_evidence_dropped_total",
            "Scheduler occurrences given up because the forwarding queue stayed full",
            registry=r,
        )
        self.window_events = Gauge(
            "tapio_controller_evidence_window_events",
            "Occurrences in the evidence window",
            registry=r,
        )
        self.window_bytes = Gauge(
            "tapio_controller_evidence_window_bytes",
            "Accounted memory of the evidence window (bounded by --evidence-window-max-bytes)",
            registry=r,
        )
        self.window_evicted = Counter(
            "tapio_controller_evidence_window_evicted_total",
            "Occurrences that left the evidence window, by bound (count, age, bytes)",
            ["reason"],
            registry=r,
        )
        self.window_duplicates = Counter(
            "tapio_controller_evidence_window_duplicates_total",
            "Occurrences not added twice (an agent re-sent a batch)",
            registry=r,
        )
