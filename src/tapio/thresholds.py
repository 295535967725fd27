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
    #: Which exits count as abnormal. Standalone it comes from the TOML ``[container]`` table,
    #: with a controller from the profile; the kernel sees the resolved flag in ``exit_flags``.
    exit_scope: ExitScope = "auto"


DEFAULTS: Final = Thresholds()
