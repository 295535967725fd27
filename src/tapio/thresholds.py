"""The detection thresholds: one type, and the only place their defaults are written.

Both configuration sources end here. Standalone, the TOML ``[thresholds]`` table decodes
straight into :class:`Thresholds`; with a controller, the Evidence Profile's defaults are derived
from :data:`DEFAULTS` (in the profile's units), compiled, served, and turned back into a
:class:`Thresholds` on the node. From there one function (``tapio.agent.kconfig.carrier``)
packs the kernel-side values into the ``tapio_config`` carrier, and the observers judge the
userspace-side values (PSI, throttling, hardware counters) with the same object.

Units are the agent's: nanoseconds and microseconds for what the kernel compares, percent for
what userspace compares. msgspec only (the node agent imports it on its start-up path).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

#: Non-negative numbers; the kernel-side ones are packed into u32/u64 fields of tapio_config.
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
NonNegNs = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Pct = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
PosInt = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
#: At most this many DNS server ports (the size of the carrier's ``dns_ports``).
MAX_DNS_PORTS: Final = 8

ExitScope = Literal["auto", "containers", "all"]
EXIT_SCOPES: Final[tuple[str, ...]] = ("auto", "containers", "all")


class Thresholds(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Every detection threshold and userspace switch, with its default."""

    # hardware counters (node observer, userspace)
    stall_pct_warning: Pct = 20.0
    stall_pct_critical: Pct = 40.0
    ipc_degradation: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    # network (kernel)
    rtt_spike_ratio: NonNegInt = 2
    rtt_spike_abs_us: NonNegInt = 500_000
    retransmit_threshold: NonNegInt = 5
    retransmit_window_ms: PosInt = 1000
    rtt_min_baseline_samples: NonNegInt = 5
    rtt_min_delta_us: NonNegInt = 5000
    rtt_sample_interval_us: NonNegInt = 100_000
    # network: DNS (kernel: ports, slow, NXDOMAIN switch; userspace: timeout sweep, flood control)
    dns_enabled: bool = True
    dns_ports: Annotated[tuple[Port, ...], msgspec.Meta(min_length=1, max_length=MAX_DNS_PORTS)] = (
        53,
    )
    dns_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)] = 5000
    dns_slow_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 100
    dns_include_nxdomain: bool = False
    #: Identical failures (name, server, RCODE, cgroup) within this window are one occurrence
    #: with a count; 0 reports each one on its own.
    dns_window_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 5000
    #: DNS occurrences per second at most; the rest are counted (``dns_rate_capped``).
    dns_cap: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    # storage (kernel)
    io_latency_warning_ns: NonNegNs = 50_000_000
    io_latency_critical_ns: NonNegNs = 200_000_000
    # node: run-queue latency (kernel), PSI and throttling (userspace)
    runq_latency_ms: NonNegInt = 50
    memory_some_pct: Pct = 10.0
    memory_full_pct: Pct = 5.0
    cpu_some_pct: Pct = 50.0
    throttle_pct: Pct = 20.0
    hysteresis_pct: Pct = 50.0
    #: Whether the node observer judges its hardware counters at all (a profile's
    #: ``node_pmc.enabled``; there is no kernel-side switch for it).
    node_pmc_enabled: bool = True
    #: Run-queue sampling is opt-in: its sched_switch hook runs on every context switch of the
    #: node, so it is attached only when this is on (CPU stalls are still found from PSI and
    #: cpu.stat without it). Off, the carrier's run-queue threshold is 0.
    runq_sampling: bool = False
    #: Which exits count as abnormal. Standalone it comes from the TOML ``[container]`` table,
    #: with a controller from the profile; the kernel sees the resolved flag in ``exit_flags``.
    exit_scope: ExitScope = "auto"

    def __post_init__(self) -> None:
        if self.dns_slow_ms >= self.dns_timeout_ms:
            raise ValueError(
                f"dns_slow_ms ({self.dns_slow_ms}) must be below dns_timeout_ms "
                f"({self.dns_timeout_ms})"
            )


DEFAULTS: Final = Thresholds()
