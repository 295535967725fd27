"""The Evidence Profile document (``docs/profile.md``) as msgspec Structs.

Every field is optional: an absent (or ``null``) field inherits from the base profile, field by
field. The Structs are built by :mod:`tapio.profile.schema`, which rejects unknown fields and
wrong types with dotted paths; ranges are checked by :mod:`tapio.profile.validate`.
"""

from __future__ import annotations

import msgspec


class _Block(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class RttSpike(_Block):
    ratio: int | None = None
    abs_ms: int | None = None


class Retransmit(_Block):
    threshold: int | None = None
    window_ms: int | None = None


class RttBaseline(_Block):
    min_samples: int | None = None
    min_delta_ms: int | None = None
    sample_interval_ms: int | None = None


class Dns(_Block):
    enabled: bool | None = None
    ports: list[int] | None = None
    timeout_ms: int | None = None
    slow_ms: int | None = None
    include_nxdomain: bool | None = None
    window_ms: int | None = None
    cap: int | None = None


class NetworkOverrides(_Block):
    enabled: bool | None = None
    dns: Dns | None = None
    rtt_spike: RttSpike | None = None
    retransmit: Retransmit | None = None
    rtt_baseline: RttBaseline | None = None


class SlowIo(_Block):
    warning_ms: int | None = None
    critical_ms: int | None = None


class StorageOverrides(_Block):
    enabled: bool | None = None
    slow_io: SlowIo | None = None


class ContainerOverrides(_Block):
    enabled: bool | None = None
    ignore_exit_codes: list[int] | None = None
    exit_scope: str | None = None
    ignore_signals: list[int] | None = None


class StallPct(_Block):
    warning: float | None = None
    critical: float | None = None


class NodePmcOverrides(_Block):
    enabled: bool | None = None
    stall_pct: StallPct | None = None
    ipc_degradation: float | None = None


class MemoryPressure(_Block):
    some_pct: float | None = None
    full_pct: float | None = None


class CpuPressure(_Block):
    some_pct: float | None = None


class NodeOverrides(_Block):
    enabled: bool | None = None
    memory_pressure: MemoryPressure | None = None
    cpu_pressure: CpuPressure | None = None
    runq_sampling: bool | None = None
    runq_latency_ms: int | None = None
    throttle_pct: float | None = None
    hysteresis_pct: float | None = None


class SchedulerLatencySpike(_Block):
    """``cluster.scheduler.latency_spike``: the p99 attempt latency and the attempts needed."""

    p99_ms: int | None = None
    min_attempts: int | None = None


class QueueBacklog(_Block):
    """``cluster.scheduler.queue_backlog``: pending pods, for how long, in which queues."""

    pending_pods: int | None = None
    sustain_seconds: int | None = None
    queues: list[str] | None = None


class SchedulerOverrides(_Block):
    """The controller's scheduler judges (see :mod:`tapio.profile.scheduler`)."""

    enabled: bool | None = None
    window_seconds: int | None = None
    hysteresis_pct: float | None = None
    latency_spike: SchedulerLatencySpike | None = None
    queue_backlog: QueueBacklog | None = None


class Overrides(_Block):
    network: NetworkOverrides | None = None
    storage: StorageOverrides | None = None
    container: ContainerOverrides | None = None
    node_pmc: NodePmcOverrides | None = None
    node: NodeOverrides | None = None
    scheduler: SchedulerOverrides | None = None


class Profile(_Block):
    api_version: str | None = msgspec.field(default=None, name="apiVersion")
    kind: str | None = None
    base: str | None = None
    overrides: Overrides | None = None
