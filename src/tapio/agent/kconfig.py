"""Turn agent settings (standalone) or a controller's compiled config into ``tapio_config``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import msgspec

from tapio.agent.settings import AgentSettings
from tapio.bpf.abi import (
    DNS_ENABLED,
    DNS_NXDOMAIN,
    EXIT_SCOPE_CONTAINERS,
    MAX_IGNORE_EXIT_CODES,
    OBSERVER_FLAGS,
    TapioConfig,
)
from tapio.profile.compiled import CompiledConfig
from tapio.thresholds import Thresholds


def on_kubernetes() -> bool:
    """A Kubernetes node: the agent runs in a pod, or the host has kubepods cgroups."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    roots = ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified")
    return any((Path(r) / name).exists() for r in roots for name in ("kubepods", "kubepods.slice"))


def exit_flags(scope: str, kubernetes: bool | None = None) -> int:
    """``containers`` (or ``auto`` on a Kubernetes node) limits exit reports to containers;
    ``kubernetes`` overrides the node detection (tests), which runs only for ``auto``."""
    if scope == "containers":
        return EXIT_SCOPE_CONTAINERS
    if scope == "auto" and (on_kubernetes() if kubernetes is None else kubernetes):
        return EXIT_SCOPE_CONTAINERS
    return 0


def observer_flags(enabled: Iterable[str]) -> int:
    """The ``tapio_config.flags`` bits of the named observers (unknown names set none)."""
    flags = 0
    for name in enabled:
        flags |= OBSERVER_FLAGS.get(name, 0)
    return flags


def signal_mask(signals: list[int]) -> int:
    mask = 0
    for sig in signals:
        if 1 <= sig <= 63:
            mask |= 1 << sig
    return mask


def runq_threshold_ns(sampling: bool, threshold_ns: int) -> int:
    """The carrier's run-queue threshold: 0 (no sampling, the hook stays detached) unless
    run-queue sampling is opted in."""
    return threshold_ns if sampling else 0


def dns_fields(t: Thresholds) -> dict[str, object]:
    """The carrier's DNS fields from the thresholds (the timeout rides along for the record:
    the agent's sweep, not the kernel, expires queries)."""
    flags = (DNS_ENABLED if t.dns_enabled else 0) | (DNS_NXDOMAIN if t.dns_include_nxdomain else 0)
    return {
        "dns_slow_ns": t.dns_slow_ms * 1_000_000,
        "dns_timeout_ns": t.dns_timeout_ms * 1_000_000,
        "dns_flags": flags,
        "dns_ports": tuple(dict.fromkeys(t.dns_ports)),
    }


def standalone_config(
    settings: AgentSettings, observers: list[str], generation: int = 1
) -> TapioConfig:
    t = settings.thresholds
    return TapioConfig(
        generation=generation,
        flags=observer_flags(observers),
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
        runq_latency_threshold_ns=runq_threshold_ns(t.runq_sampling, t.runq_latency_ms * 1_000_000),
        **dns_fields(t),  # type: ignore[arg-type]
    )


def user_thresholds(settings: AgentSettings) -> Thresholds:
    """Standalone: the TOML thresholds (their exit scope already taken from ``[container]``)."""
    return settings.thresholds


def from_compiled(
    compiled: CompiledConfig, generation: int, *, kubernetes: bool | None = None
) -> tuple[TapioConfig, Thresholds]:
    """Controller mode: a served ``CompiledConfig`` (+ its ``version`` as ``generation``) as the
    kernel ``tapio_config`` and the thresholds the observers judge with in userspace.

    ``flags`` come from each block's ``enabled`` (``node.enabled`` drives the node observer's
    bit; ``node_pmc.enabled`` only gates its hardware-counter part, a userspace threshold).
    ``container.exit_scope: auto`` is resolved exactly as in standalone mode (``kubernetes``
    overrides the detection, for tests). Permille/milli values become the percent/ratio floats
    the observers judge with.
    """
    net, sto, con, pmc, node = (
        compiled.network,
        compiled.storage,
        compiled.container,
        compiled.node_pmc,
        compiled.node,
    )
    enabled = {
        "network": net.enabled,
        "storage": sto.enabled,
        "container": con.enabled,
        "node": node.enabled,
    }
    flags = observer_flags(name for name, on in enabled.items() if on)
    scope = con.exit_scope
    scope_flags = exit_flags(scope, kubernetes)
    kernel = TapioConfig(
        generation=generation,
        flags=flags,
        slow_io_threshold_ns=sto.slow_io_warning_ns,
        io_latency_critical_ns=sto.slow_io_critical_ns,
        retransmit_window_ns=net.retransmit_window_ns,
        retransmit_threshold=net.retransmit_threshold,
        rtt_spike_multiplier=net.rtt_spike_ratio,
        rtt_spike_abs_us=net.rtt_spike_abs_us,
        rtt_min_baseline_samples=net.rtt_min_baseline_samples,
        rtt_min_delta_us=net.rtt_min_delta_us,
        rtt_sample_interval_us=net.rtt_sample_interval_us,
        exit_flags=scope_flags,
        ignore_exit_codes=tuple(dict.fromkeys(con.ignore_exit_codes))[:MAX_IGNORE_EXIT_CODES],
        ignore_signal_mask=signal_mask(list(con.ignore_signals)),
        runq_latency_threshold_ns=runq_threshold_ns(node.runq_sampling, node.runq_latency_ns),
    )
    user = Thresholds(
        dns_enabled=net.dns_enabled,
        dns_ports=tuple(net.dns_ports),
        dns_timeout_ms=net.dns_timeout_ns // 1_000_000,
        dns_slow_ms=net.dns_slow_ns // 1_000_000,
        dns_include_nxdomain=net.dns_include_nxdomain,
        dns_window_ms=net.dns_window_ns // 1_000_000,
        dns_cap=net.dns_cap,
        memory_some_pct=node.memory_some_permille / 10,
        memory_full_pct=node.memory_full_permille / 10,
        cpu_some_pct=node.cpu_some_permille / 10,
        throttle_pct=node.throttle_permille / 10,
        hysteresis_pct=node.hysteresis_permille / 10,
        stall_pct_warning=pmc.stall_warning_permille / 10,
        stall_pct_critical=pmc.stall_critical_permille / 10,
        ipc_degradation=pmc.ipc_degradation_milli / 1000,
        node_pmc_enabled=pmc.enabled,
        runq_sampling=node.runq_sampling,
        runq_latency_ms=node.runq_latency_ns // 1_000_000,
        exit_scope=scope,  # type: ignore[arg-type]  # checked by ConfigResponse.validate
    )
    kernel = msgspec.structs.replace(kernel, **dns_fields(user))
    return kernel, user
