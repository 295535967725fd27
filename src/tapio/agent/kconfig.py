"""Turn agent settings (standalone) into the kernel's ``tapio_config`` value."""

from __future__ import annotations

import os
from pathlib import Path

from tapio.agent.settings import AgentSettings
from tapio.bpf.abi import (
    EXIT_SCOPE_CONTAINERS,
    FLAG_CONTAINER,
    FLAG_NETWORK,
    FLAG_NODE,
    FLAG_STORAGE,
    TapioConfig,
)
from tapio.observers.base import UserThresholds

OBSERVER_FLAGS = {
    "network": FLAG_NETWORK,
    "storage": FLAG_STORAGE,
    "container": FLAG_CONTAINER,
    "node": FLAG_NODE,
}


def on_kubernetes() -> bool:
    """A Kubernetes node: the agent runs in a pod, or the host has kubepods cgroups."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    roots = ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified")
    return any((Path(r) / name).exists() for r in roots for name in ("kubepods", "kubepods.slice"))


def exit_flags(scope: str) -> int:
    if scope == "containers" or (scope == "auto" and on_kubernetes()):
        return EXIT_SCOPE_CONTAINERS
    return 0


def signal_mask(signals: list[int]) -> int:
    mask = 0
    for sig in signals:
        if 1 <= sig <= 63:
            mask |= 1 << sig
    return mask


def standalone_config(
    settings: AgentSettings, observers: list[str], generation: int = 1
) -> TapioConfig:
    t = settings.thresholds
    flags = 0
    for name in observers:
        flags |= OBSERVER_FLAGS.get(name, 0)
    return TapioConfig(
        generation=generation,
        flags=flags,
        slow_io_threshold_ns=t.io_latency_warning_ns,
        io_latency_critical_ns=t.io_latency_critical_ns,
        retransmit_window_ns=t.retransmit_window_ms * 1_000_000,
        retransmit_threshold=t.retransmit_threshold,
        rtt_spike_multiplier=t.rtt_spike_ratio,
        rtt_spike_abs_us=t.rtt_spike_abs_us,
        rtt_min_baseline_samples=t.rtt_min_baseline_samples,
        rtt_min_delta_us=t.rtt_min_delta_us,
        rtt_sample_interval_us=t.rtt_sample_interval_us,
        exit_flags=exit_flags(settings.container.exit_scope),
        ignore_exit_codes=tuple(dict.fromkeys(settings.container.ignore_exit_codes)),
        ignore_signal_mask=signal_mask(settings.container.ignore_signals),
        runq_latency_threshold_ns=t.runq_latency_ms * 1_000_000,
    )


def user_thresholds(settings: AgentSettings) -> UserThresholds:
    t = settings.thresholds
    return UserThresholds(
        memory_some_pct=t.memory_some_pct,
        memory_full_pct=t.memory_full_pct,
        cpu_some_pct=t.cpu_some_pct,
        throttle_pct=t.throttle_pct,
        hysteresis_pct=t.hysteresis_pct,
        stall_pct_warning=t.stall_pct_warning,
        stall_pct_critical=t.stall_pct_critical,
        ipc_degradation=t.ipc_degradation,
        exit_scope=settings.container.exit_scope,
    )
