"""Agent self-metrics: names and labels are a public interface (dashboards and alerts use them).

One private registry so tests and embedders never collide with prometheus-client's global one.
Hot paths increment once per batch, never once per event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from tapio.buildinfo import LATENCY_BUCKETS, register_self_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
register_self_metrics(REGISTRY)  # tapio_build_info, process_* (CPU, RSS, open fds)

EVENTS = Counter(
    "tapio_events_total", "Total events drained from ring buffer", ["observer"], registry=REGISTRY
)
ANOMALIES = Counter(
    "tapio_anomalies_total",
    "Total anomalies detected and emitted",
    ["observer", "anomaly_type"],
    registry=REGISTRY,
)
LOST_EVENTS = Counter(
    "tapio_lost_events_total",
    "Records lost in eBPF at the ring buffer reserve, by reason: ring_full (the agent did not "
    "drain in time) or reserve_refused (refused twice although the ring showed room)",
    ["observer", "reason"],
    registry=REGISTRY,
)
MALFORMED_EVENTS = Counter(
    "tapio_malformed_events_total",
    "Malformed or truncated eBPF records dropped by userspace",
    ["observer"],
    registry=REGISTRY,
)
CORRELATION_DROPS = Counter(
    "tapio_correlation_drops_total",
    "Events intentionally dropped because kernel correlation was ambiguous",
    ["observer", "reason"],
    registry=REGISTRY,
)
DRAIN_BATCH = Histogram(
    "tapio_drain_batch_size",
    "Records taken from one ring buffer in one drain pass (passes that found records)",
    ["observer"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
    registry=REGISTRY,
)
DRAIN_CAP = Counter(
    "tapio_drain_cap_total",
    "Times ring buffer drain hit the per-tick cap",
    ["observer"],
    registry=REGISTRY,
)
SINK_WRITES = Counter(
    "tapio_sink_writes_total",
    "Total sink write attempts by result",
    ["sink", "result"],
    registry=REGISTRY,
)
SINK_DROPS = Counter(
    "tapio_sink_drops_total",
    "Total sink events dropped by sink and reason (queue_full: the agent's fan-out lane into "
    "the sink was full; buffer_full: a network sink's own buffer; others: docs/sinks.md)",
    ["sink", "reason"],
    registry=REGISTRY,
)
CONTROLLER_SEND_FAILURES = Counter(
    "tapio_controller_send_failures_total",
    "Controller send failures by request kind",
    ["kind"],
    registry=REGISTRY,
)
CONTROLLER_REREGISTRATIONS = Counter(
    "tapio_controller_reregistrations_total",
    "Accepted hellos after the controller stopped knowing this agent, by what revealed it",
    ["reason"],
    registry=REGISTRY,
)
CONFIG_FETCH = Counter(
    "tapio_config_fetch_total",
    "Controller config poll attempts by result",
    ["result"],
    registry=REGISTRY,
)

# Tapio additions (documented in docs/operations.md).
CONFIG_ABI_MISMATCH = Counter(
    "tapio_config_abi_mismatch_total",
    "BPF program invocations that found a tapio_config with the wrong abi_version",
    ["observer"],
    registry=REGISTRY,
)
KERNEL_DROPS = Counter(
    "tapio_kernel_drops_total",
    "Kernel-side filtered or unattributable records, by observer and reason",
    ["observer", "reason"],
    registry=REGISTRY,
)
OBSERVER_UP = Gauge(
    "tapio_observer_up",
    "1 when the observer's BPF programs are loaded and attached",
    ["observer"],
    registry=REGISTRY,
)
OBSERVER_CAPABILITY = Gauge(
    "tapio_observer_capability",
    "1 when the kernel offers the capability the observer would use, 0 when it does not",
    ["observer", "capability"],
    registry=REGISTRY,
)
CONFIG_GENERATION = Gauge(
    "tapio_config_generation",
    "Generation of the tapio_config currently written to the BPF carriers (0 = inert)",
    registry=REGISTRY,
)

# HTTP / OTLP sink delivery (docs/sinks.md).
SINK_QUEUE_DEPTH = Gauge(
    "tapio_sink_queue_depth",
    "Occurrences held in a sink's internal buffer (including the batch in flight)",
    ["sink"],
    registry=REGISTRY,
)
SINK_REQUEST_DURATION = Histogram(
    "tapio_sink_request_duration_seconds",
    "Duration of one delivery attempt of a network sink (request sent to answer read, "
    "failed attempts included)",
    ["sink"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
SINK_RETRIES = Counter(
    "tapio_sink_retries_total",
    "Batch delivery attempts that failed and were scheduled for another try",
    ["sink"],
    registry=REGISTRY,
)

# Observer and enrichment drop points (docs/observers/pipeline.md).
OBSERVER_DROPS = Counter(
    "tapio_observer_drops_total",
    "Ring records userspace dropped before they became occurrences, by reason: "
    "unknown_record_type (an event type or opcode this agent does not know), "
    "not_an_anomaly (a record the kernel should have filtered), "
    "classifier_error (the observer's classifier raised; the whole payload is dropped)",
    ["observer", "reason"],
    registry=REGISTRY,
)
ENRICHMENT_ERRORS = Counter(
    "tapio_enrichment_errors_total",
    "Occurrences delivered without cgroup/container facts because enrichment raised",
    ["observer"],
    registry=REGISTRY,
)
CGROUP_LOOKUPS = Counter(
    "tapio_cgroup_lookups_total",
    "cgroup id to path lookups: hit (cached), miss (needed a walk of the hierarchy, done in a "
    "worker thread), unknown (no such cgroup: gone, or outside the walked tree)",
    ["result"],
    registry=REGISTRY,
)
CGROUP_INDEX_EVENTS = Counter(
    "tapio_cgroup_index_events_total",
    "cgroups the id index learned from its inotify watch (add: made or found while watching; "
    "remove: removed, kept as a tombstone for a few minutes)",
    ["event"],
    registry=REGISTRY,
)
CGROUP_WATCH_LIMIT = Counter(
    "tapio_cgroup_watch_limit_total",
    "cgroup directories left unwatched because the watch bound (or the kernel's "
    "max_user_watches) was reached; their cgroups are found by the periodic re-index only",
    registry=REGISTRY,
)
CGROUP_TOMBSTONE_HITS = Counter(
    "tapio_cgroup_tombstone_hits_total",
    "cgroup id lookups answered by a removed cgroup's tombstone",
    registry=REGISTRY,
)
