"""Compile a validated profile into the CompiledConfig the controller serves.

Infallible by construction: every value was range-checked by validate.py, and every unit
conversion here stays inside the u32/u64 field types for those ranges. Deterministic: no clock,
no randomness, no dict-order dependence (lists keep the profile's first-occurrence order).
"""

from __future__ import annotations

from tapio.profile.compiled import (
    CompiledConfig,
    ContainerConfig,
    NetworkConfig,
    NodeConfig,
    NodePmcConfig,
    StorageConfig,
    permille,
    round_half_away,
)
from tapio.profile.validate import Resolved


def compile_resolved(r: Resolved) -> CompiledConfig:
    return CompiledConfig(
        network=NetworkConfig(
            enabled=r.network_enabled,
            rtt_spike_ratio=r.rtt_spike_ratio,
            rtt_spike_abs_us=r.rtt_spike_abs_ms * 1000,
            rtt_min_baseline_samples=r.rtt_min_samples,
            conn_refused_window_ns=0,
            conn_refused_min_count=0,
            retransmit_threshold=r.retransmit_threshold,
            retransmit_window_ns=r.retransmit_window_ms * 1_000_000,
            rtt_min_delta_us=r.rtt_min_delta_ms * 1000,
            rtt_sample_interval_us=r.rtt_sample_interval_ms * 1000,
            dns_enabled=r.dns_enabled,
            dns_ports=tuple(r.dns_ports),
            dns_timeout_ns=r.dns_timeout_ms * 1_000_000,
            dns_slow_ns=r.dns_slow_ms * 1_000_000,
            dns_include_nxdomain=r.dns_include_nxdomain,
            dns_window_ns=r.dns_window_ms * 1_000_000,
            dns_cap=r.dns_cap,
        ),
        storage=StorageConfig(
            enabled=r.storage_enabled,
            slow_io_warning_ns=r.slow_io_warning_ms * 1_000_000,
            slow_io_critical_ns=r.slow_io_critical_ms * 1_000_000,
        ),
        container=ContainerConfig(
            enabled=r.container_enabled,
            ignore_exit_codes=list(r.ignore_exit_codes),
            exit_scope=r.exit_scope,
            ignore_signals=list(r.ignore_signals),
        ),
        node_pmc=NodePmcConfig(
            enabled=r.node_pmc_enabled,
            stall_warning_permille=permille(r.stall_warning_pct),
            stall_critical_permille=permille(r.stall_critical_pct),
            ipc_degradation_milli=round_half_away(r.ipc_degradation * 1000.0),
        ),
        node=NodeConfig(
            enabled=r.node_enabled,
            memory_some_permille=permille(r.memory_some_pct),
            memory_full_permille=permille(r.memory_full_pct),
            cpu_some_permille=permille(r.cpu_some_pct),
            runq_latency_ns=r.runq_latency_ms * 1_000_000,
            throttle_permille=permille(r.throttle_pct),
            hysteresis_permille=permille(r.hysteresis_pct),
        ),
    )
