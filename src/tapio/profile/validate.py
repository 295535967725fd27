"""Semantic pass: ranges and cross-field rules, in a fixed order.

Only the first error is reported (no accumulation), so messages stay stable: the order is
apiVersion, kind, base (present, name syntax, known), then network, storage, container,
node_pmc, Tapio's ``node`` block and finally the controller's ``scheduler`` block, each field
in declared order, and an order check (critical >= warning) right after the two fields it
relates, against the *merged* values.

Messages keep one stable textual form that operators and other controllers match on: ranges
rendered ``1..=100`` / ``0.0..=100.0``, floats printed like Rust's ``{}`` (``20`` rather than
``20.0``) and strings like Rust's ``{:?}``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypeVar

from tapio.profile.errors import ProfileError
from tapio.profile.model import (
    ContainerOverrides,
    CpuPressure,
    MemoryPressure,
    NetworkOverrides,
    NodeOverrides,
    NodePmcOverrides,
    Profile,
    Retransmit,
    RttBaseline,
    RttSpike,
    SlowIo,
    StallPct,
    StorageOverrides,
)
from tapio.profile.scheduler import SchedulerThresholds, resolve_scheduler
from tapio.thresholds import DEFAULTS, EXIT_SCOPES

API_VERSION: Final = "tapio.false.systems/v0"
KIND: Final = "EvidenceProfile"
PRODUCTION_DEFAULT: Final = "production-default"
KNOWN_BASES: Final = (PRODUCTION_DEFAULT,)
MAX_IGNORE_EXIT_CODES: Final = 16
MAX_IGNORE_SIGNALS: Final = 64

_T = TypeVar("_T")

_BASE_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")


_D = DEFAULTS
DEFAULT_SCHEDULER: Final = SchedulerThresholds()


@dataclass(frozen=True, slots=True)
class Resolved:
    """A base merged with overrides, still in profile units (ms, percent).

    The defaults (the ``production-default`` base) are the agent's own threshold defaults
    (:data:`tapio.thresholds.DEFAULTS`) converted to profile units, so a value is written once.
    """

    network_enabled: bool = True
    rtt_spike_ratio: int = _D.rtt_spike_ratio
    rtt_spike_abs_ms: int = _D.rtt_spike_abs_us // 1000
    retransmit_threshold: int = _D.retransmit_threshold
    retransmit_window_ms: int = _D.retransmit_window_ms
    rtt_min_samples: int = _D.rtt_min_baseline_samples
    rtt_min_delta_ms: int = _D.rtt_min_delta_us // 1000
    rtt_sample_interval_ms: int = _D.rtt_sample_interval_us // 1000
    storage_enabled: bool = True
    slow_io_warning_ms: int = _D.io_latency_warning_ns // 1_000_000
    slow_io_critical_ms: int = _D.io_latency_critical_ns // 1_000_000
    container_enabled: bool = True
    ignore_exit_codes: tuple[int, ...] = ()
    exit_scope: str = _D.exit_scope
    ignore_signals: tuple[int, ...] = ()
    node_pmc_enabled: bool = _D.node_pmc_enabled
    stall_warning_pct: float = _D.stall_pct_warning
    stall_critical_pct: float = _D.stall_pct_critical
    ipc_degradation: float = _D.ipc_degradation
    node_enabled: bool = True
    memory_some_pct: float = _D.memory_some_pct
    memory_full_pct: float = _D.memory_full_pct
    cpu_some_pct: float = _D.cpu_some_pct
    runq_latency_ms: int = _D.runq_latency_ms
    throttle_pct: float = _D.throttle_pct
    hysteresis_pct: float = _D.hysteresis_pct
    scheduler: SchedulerThresholds = DEFAULT_SCHEDULER


BASES: Final = {PRODUCTION_DEFAULT: Resolved()}


def rust_debug_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def rust_float(value: float) -> str:
    """Rust's ``{}`` for f64: shortest round-trip digits, never an exponent, no ``.0``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _int_range(path: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ProfileError(path, f"value {value} out of range {lo}..={hi}")
    return value


def _float_range(path: str, value: float, lo: float, hi: float) -> float:
    if not math.isfinite(value):
        raise ProfileError(path, "value must be finite")
    if not lo <= value <= hi:
        raise ProfileError(path, f"value {rust_float(value)} out of range {lo!r}..={hi!r}")
    return value


def _optional_str(value: str | None) -> str:
    return f"Some({rust_debug_str(value)})" if value is not None else "None"


def _header(profile: Profile) -> Resolved:
    if profile.api_version != API_VERSION:
        raise ProfileError(
            "apiVersion",
            f"unsupported apiVersion {_optional_str(profile.api_version)}, "
            f"expected {rust_debug_str(API_VERSION)}",
        )
    if profile.kind != KIND:
        raise ProfileError(
            "kind",
            f"unsupported kind {_optional_str(profile.kind)}, expected {rust_debug_str(KIND)}",
        )
    if profile.base is None:
        raise ProfileError("base", "base profile is required")
    if _BASE_NAME.fullmatch(profile.base) is None:
        raise ProfileError("base", f"invalid profile name {rust_debug_str(profile.base)}")
    base = BASES.get(profile.base)
    if base is None:
        available = ", ".join(rust_debug_str(b) for b in KNOWN_BASES)
        raise ProfileError(
            "base",
            f"unknown base profile {rust_debug_str(profile.base)}, available: [{available}]",
        )
    return base


def _pick(override: _T | None, inherited: _T) -> _T:
    return inherited if override is None else override


def _network(o: NetworkOverrides, r: Resolved, p: str) -> dict[str, Any]:
    spike = o.rtt_spike or RttSpike()
    rtx = o.retransmit or Retransmit()
    bl = o.rtt_baseline or RttBaseline()
    out: dict[str, Any] = {"network_enabled": _pick(o.enabled, r.network_enabled)}
    if spike.ratio is not None:
        out["rtt_spike_ratio"] = _int_range(f"{p}.rtt_spike.ratio", spike.ratio, 1, 100)
    if spike.abs_ms is not None:
        out["rtt_spike_abs_ms"] = _int_range(f"{p}.rtt_spike.abs_ms", spike.abs_ms, 1, 600_000)
    if rtx.threshold is not None:
        out["retransmit_threshold"] = _int_range(
            f"{p}.retransmit.threshold", rtx.threshold, 1, 100_000
        )
    if rtx.window_ms is not None:
        out["retransmit_window_ms"] = _int_range(
            f"{p}.retransmit.window_ms", rtx.window_ms, 1, 600_000
        )
    if bl.min_samples is not None:
        out["rtt_min_samples"] = _int_range(
            f"{p}.rtt_baseline.min_samples", bl.min_samples, 1, 1000
        )
    if bl.min_delta_ms is not None:
        out["rtt_min_delta_ms"] = _int_range(
            f"{p}.rtt_baseline.min_delta_ms", bl.min_delta_ms, 0, 60_000
        )
    if bl.sample_interval_ms is not None:
        out["rtt_sample_interval_ms"] = _int_range(
            f"{p}.rtt_baseline.sample_interval_ms", bl.sample_interval_ms, 1, 60_000
        )
    return out


def _storage(o: StorageOverrides, r: Resolved, p: str) -> dict[str, Any]:
    slow = o.slow_io or SlowIo()
    warning = r.slow_io_warning_ms
    critical = r.slow_io_critical_ms
    if slow.warning_ms is not None:
        warning = _int_range(f"{p}.slow_io.warning_ms", slow.warning_ms, 1, 60_000)
    if slow.critical_ms is not None:
        critical = _int_range(f"{p}.slow_io.critical_ms", slow.critical_ms, 1, 600_000)
    if critical < warning:
        raise ProfileError(f"{p}.slow_io", f"{critical} must be >= {warning}")
    return {
        "storage_enabled": _pick(o.enabled, r.storage_enabled),
        "slow_io_warning_ms": warning,
        "slow_io_critical_ms": critical,
    }


def _int_set(p: str, name: str, values: list[int], most: int, lo: int, hi: int) -> tuple[int, ...]:
    """A bounded list of integers in [lo, hi], de-duplicated in first-seen order."""
    if len(values) > most:
        raise ProfileError(f"{p}.{name}", f"at most {most} {name}, got {len(values)}")
    for i, v in enumerate(values):
        _int_range(f"{p}.{name}[{i}]", v, lo, hi)
    return tuple(dict.fromkeys(values))


def _container(o: ContainerOverrides, r: Resolved, p: str) -> dict[str, Any]:
    out: dict[str, Any] = {"container_enabled": _pick(o.enabled, r.container_enabled)}
    if o.ignore_exit_codes is not None:
        out["ignore_exit_codes"] = _int_set(
            p, "ignore_exit_codes", o.ignore_exit_codes, MAX_IGNORE_EXIT_CODES, 0, 255
        )
    if o.exit_scope is not None:
        if o.exit_scope not in EXIT_SCOPES:
            choices = ", ".join(rust_debug_str(s) for s in EXIT_SCOPES)
            raise ProfileError(
                f"{p}.exit_scope",
                f"invalid value {rust_debug_str(o.exit_scope)}, expected one of {choices}",
            )
        out["exit_scope"] = o.exit_scope
    if o.ignore_signals is not None:
        out["ignore_signals"] = _int_set(
            p, "ignore_signals", o.ignore_signals, MAX_IGNORE_SIGNALS, 1, 64
        )
    return out


def _node_pmc(o: NodePmcOverrides, r: Resolved, p: str) -> dict[str, Any]:
    stall = o.stall_pct or StallPct()
    warning = r.stall_warning_pct
    critical = r.stall_critical_pct
    if stall.warning is not None:
        warning = _float_range(f"{p}.stall_pct.warning", stall.warning, 0.0, 100.0)
    if stall.critical is not None:
        critical = _float_range(f"{p}.stall_pct.critical", stall.critical, 0.0, 100.0)
    if critical < warning:
        raise ProfileError(
            f"{p}.stall_pct", f"{rust_float(critical)} must be >= {rust_float(warning)}"
        )
    out: dict[str, Any] = {
        "node_pmc_enabled": _pick(o.enabled, r.node_pmc_enabled),
        "stall_warning_pct": warning,
        "stall_critical_pct": critical,
    }
    if o.ipc_degradation is not None:
        out["ipc_degradation"] = _float_range(f"{p}.ipc_degradation", o.ipc_degradation, 0.0, 16.0)
    return out


def _node(o: NodeOverrides, r: Resolved, p: str) -> dict[str, Any]:
    mem = o.memory_pressure or MemoryPressure()
    cpu = o.cpu_pressure or CpuPressure()
    out: dict[str, Any] = {"node_enabled": _pick(o.enabled, r.node_enabled)}
    if mem.some_pct is not None:
        out["memory_some_pct"] = _float_range(
            f"{p}.memory_pressure.some_pct", mem.some_pct, 0.0, 100.0
        )
    if mem.full_pct is not None:
        out["memory_full_pct"] = _float_range(
            f"{p}.memory_pressure.full_pct", mem.full_pct, 0.0, 100.0
        )
    if cpu.some_pct is not None:
        out["cpu_some_pct"] = _float_range(f"{p}.cpu_pressure.some_pct", cpu.some_pct, 0.0, 100.0)
    if o.runq_latency_ms is not None:
        out["runq_latency_ms"] = _int_range(f"{p}.runq_latency_ms", o.runq_latency_ms, 1, 10_000)
    if o.throttle_pct is not None:
        out["throttle_pct"] = _float_range(f"{p}.throttle_pct", o.throttle_pct, 0.0, 100.0)
    if o.hysteresis_pct is not None:
        out["hysteresis_pct"] = _float_range(f"{p}.hysteresis_pct", o.hysteresis_pct, 0.0, 100.0)
    return out


def resolve(profile: Profile) -> Resolved:
    """Validate ``profile`` and merge it over its base; raises the first ProfileError."""
    base = _header(profile)
    overrides = profile.overrides
    if overrides is None:
        return base
    merged: dict[str, Any] = {}
    merged.update(_network(overrides.network or NetworkOverrides(), base, "overrides.network"))
    merged.update(_storage(overrides.storage or StorageOverrides(), base, "overrides.storage"))
    merged.update(
        _container(overrides.container or ContainerOverrides(), base, "overrides.container")
    )
    merged.update(_node_pmc(overrides.node_pmc or NodePmcOverrides(), base, "overrides.node_pmc"))
    merged.update(_node(overrides.node or NodeOverrides(), base, "overrides.node"))
    merged["scheduler"] = resolve_scheduler(
        overrides.scheduler, base.scheduler, "overrides.scheduler"
    )
    return dataclasses.replace(base, **merged)
