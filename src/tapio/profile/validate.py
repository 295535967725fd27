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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from tapio.profile.errors import ProfileError
from tapio.profile.model import Profile
from tapio.profile.scheduler import SCHEDULER_QUEUES, SchedulerThresholds
from tapio.thresholds import DEFAULTS, EXIT_SCOPES, MAX_DNS_PORTS

API_VERSION: Final = "tapio.false.systems/v0"
KIND: Final = "EvidenceProfile"
PRODUCTION_DEFAULT: Final = "production-default"
KNOWN_BASES: Final = (PRODUCTION_DEFAULT,)
MAX_IGNORE_EXIT_CODES: Final = 16
MAX_IGNORE_SIGNALS: Final = 64

_BASE_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")

_D = DEFAULTS


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


def _bounded_set(
    p: str, name: str, values: list[int], most: int, lo: int, hi: int
) -> tuple[int, ...]:
    """A bounded list of integers in [lo, hi], de-duplicated in first-seen order."""
    if len(values) > most:
        raise ProfileError(f"{p}.{name}", f"at most {most} {name}, got {len(values)}")
    for i, v in enumerate(values):
        _int_range(f"{p}.{name}[{i}]", v, lo, hi)
    return tuple(dict.fromkeys(values))


_Check = Callable[[str, Any], Any]


def _ints(lo: int, hi: int) -> _Check:
    return lambda path, value: _int_range(path, value, lo, hi)


def _floats(lo: float, hi: float) -> _Check:
    return lambda path, value: _float_range(path, value, lo, hi)


def _int_set(most: int, lo: int, hi: int) -> _Check:
    def check(path: str, values: list[int]) -> tuple[int, ...]:
        parent, _, name = path.rpartition(".")
        return _bounded_set(parent, name, values, most, lo, hi)

    return check


def _ports(path: str, values: list[int]) -> tuple[int, ...]:
    """DNS server ports: 1 to MAX_DNS_PORTS of them, each a port number, de-duplicated."""
    if not values:
        raise ProfileError(path, "at least 1 port, got 0")
    parent, _, name = path.rpartition(".")
    return _bounded_set(parent, name, values, MAX_DNS_PORTS, 1, 65535)


def _one_of(choices: Sequence[str]) -> _Check:
    def check(path: str, value: str) -> str:
        if value not in choices:
            listed = ", ".join(rust_debug_str(c) for c in choices)
            raise ProfileError(
                path, f"invalid value {rust_debug_str(value)}, expected one of {listed}"
            )
        return value

    return check


def _str_set(choices: Sequence[str]) -> _Check:
    """A non-empty list of ``choices``, de-duplicated in first-seen order."""
    one = _one_of(choices)

    def check(path: str, values: list[str]) -> tuple[str, ...]:
        if not values:
            raise ProfileError(path, "at least one value")
        return tuple(dict.fromkeys(one(f"{path}[{i}]", v) for i, v in enumerate(values)))

    return check


def _flag(path: str, value: bool) -> bool:
    return value


_FLAG: Final[_Check] = _flag


@dataclass(frozen=True, slots=True)
class _Rule:
    path: str  # below ``overrides``, dotted
    check: _Check  # (full dotted path, given value) -> the value to keep, or ProfileError


def _rule(path: str, check: _Check, default: Any) -> Any:
    """A Resolved field with its default and the rule for the profile value that overrides it."""
    return dataclasses.field(default=default, metadata={"rule": _Rule(path, check)})


def _rules_in(block: str) -> Callable[[str, _Check, Any], Any]:
    """``_rule`` for the fields of one overrides block (paths below the block)."""
    return lambda path, check, default: _rule(f"{block}.{path}", check, default)


_NET, _STO, _CON, _PMC, _NODE = map(
    _rules_in, ("network", "storage", "container", "node_pmc", "node")
)
_S: Final = SchedulerThresholds()  # the scheduler block's defaults (tapio.profile.scheduler)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A base merged with overrides, still in profile units (ms, percent).

    Each field also says where a profile sets it (its path below ``overrides``) and how that
    value is checked, so a threshold's default, its profile path and its range are written once,
    here; :func:`resolve` walks the fields in declared order, which is the profile's order.

    The defaults (the ``production-default`` base) are the agent's own threshold defaults
    (:data:`tapio.thresholds.DEFAULTS`) converted to profile units, so a value is written once.
    """

    network_enabled: bool = _NET("enabled", _FLAG, True)
    rtt_spike_ratio: int = _NET("rtt_spike.ratio", _ints(1, 100), _D.rtt_spike_ratio)
    rtt_spike_abs_ms: int = _NET("rtt_spike.abs_ms", _ints(1, 600_000), _D.rtt_spike_abs_us // 1000)
    retransmit_threshold: int = _NET(
        "retransmit.threshold", _ints(1, 100_000), _D.retransmit_threshold
    )
    retransmit_window_ms: int = _NET(
        "retransmit.window_ms", _ints(1, 600_000), _D.retransmit_window_ms
    )
    rtt_min_samples: int = _NET(
        "rtt_baseline.min_samples", _ints(1, 1000), _D.rtt_min_baseline_samples
    )
    rtt_min_delta_ms: int = _NET(
        "rtt_baseline.min_delta_ms", _ints(0, 60_000), _D.rtt_min_delta_us // 1000
    )
    rtt_sample_interval_ms: int = _NET(
        "rtt_baseline.sample_interval_ms", _ints(1, 60_000), _D.rtt_sample_interval_us // 1000
    )
    dns_enabled: bool = _NET("dns.enabled", _FLAG, _D.dns_enabled)
    dns_ports: tuple[int, ...] = _NET("dns.ports", _ports, _D.dns_ports)
    dns_timeout_ms: int = _NET("dns.timeout_ms", _ints(100, 60_000), _D.dns_timeout_ms)
    dns_slow_ms: int = _NET("dns.slow_ms", _ints(1, 60_000), _D.dns_slow_ms)
    dns_include_nxdomain: bool = _NET("dns.include_nxdomain", _FLAG, _D.dns_include_nxdomain)
    dns_window_ms: int = _NET("dns.window_ms", _ints(0, 600_000), _D.dns_window_ms)
    dns_cap: int = _NET("dns.cap", _ints(1, 100_000), _D.dns_cap)
    storage_enabled: bool = _STO("enabled", _FLAG, True)
    slow_io_warning_ms: int = _STO(
        "slow_io.warning_ms", _ints(1, 60_000), _D.io_latency_warning_ns // 1_000_000
    )
    slow_io_critical_ms: int = _STO(
        "slow_io.critical_ms", _ints(1, 600_000), _D.io_latency_critical_ns // 1_000_000
    )
    container_enabled: bool = _CON("enabled", _FLAG, True)
    ignore_exit_codes: tuple[int, ...] = _CON(
        "ignore_exit_codes", _int_set(MAX_IGNORE_EXIT_CODES, 0, 255), ()
    )
    exit_scope: str = _CON("exit_scope", _one_of(EXIT_SCOPES), _D.exit_scope)
    ignore_signals: tuple[int, ...] = _CON(
        "ignore_signals", _int_set(MAX_IGNORE_SIGNALS, 1, 64), ()
    )
    node_pmc_enabled: bool = _PMC("enabled", _FLAG, _D.node_pmc_enabled)
    stall_warning_pct: float = _PMC("stall_pct.warning", _floats(0.0, 100.0), _D.stall_pct_warning)
    stall_critical_pct: float = _PMC(
        "stall_pct.critical", _floats(0.0, 100.0), _D.stall_pct_critical
    )
    ipc_degradation: float = _PMC("ipc_degradation", _floats(0.0, 16.0), _D.ipc_degradation)
    node_enabled: bool = _NODE("enabled", _FLAG, True)
    memory_some_pct: float = _NODE(
        "memory_pressure.some_pct", _floats(0.0, 100.0), _D.memory_some_pct
    )
    memory_full_pct: float = _NODE(
        "memory_pressure.full_pct", _floats(0.0, 100.0), _D.memory_full_pct
    )
    cpu_some_pct: float = _NODE("cpu_pressure.some_pct", _floats(0.0, 100.0), _D.cpu_some_pct)
    runq_sampling: bool = _NODE("runq_sampling", _FLAG, _D.runq_sampling)
    runq_latency_ms: int = _NODE("runq_latency_ms", _ints(1, 10_000), _D.runq_latency_ms)
    throttle_pct: float = _NODE("throttle_pct", _floats(0.0, 100.0), _D.throttle_pct)
    hysteresis_pct: float = _NODE("hysteresis_pct", _floats(0.0, 100.0), _D.hysteresis_pct)
    # the controller's scheduler judges (never compiled into the agents' config; see below)
    scheduler: SchedulerThresholds = _S


BASES: Final = {PRODUCTION_DEFAULT: Resolved()}
# A critical threshold must not be below its warning one: checked on the merged values right
# after the critical field, and reported at the block holding the pair.
_AT_LEAST: Final = {
    "slow_io_critical_ms": "slow_io_warning_ms",
    "stall_critical_pct": "stall_warning_pct",
}
# A value that must stay strictly below another (declared before it), on the merged values.
_BELOW: Final = {"dns_slow_ms": "dns_timeout_ms"}
_RULES: Final = tuple(
    (f.name, f.metadata["rule"]) for f in dataclasses.fields(Resolved) if "rule" in f.metadata
)
# The ``scheduler`` block, checked last; a path below the block names the SchedulerThresholds
# field (``latency_spike.p99_ms`` is ``SchedulerThresholds.latency_spike.p99_ms``).
_SCHEDULER_RULES: Final = tuple(
    _Rule(f"scheduler.{path}", check)
    for path, check in (
        ("enabled", _FLAG),
        ("window_seconds", _ints(10, 3600)),
        ("hysteresis_pct", _floats(1.0, 100.0)),
        ("latency_spike.p99_ms", _ints(1, 600_000)),
        ("latency_spike.min_attempts", _ints(1, 1_000_000)),
        ("queue_backlog.pending_pods", _ints(1, 10_000_000)),
        ("queue_backlog.sustain_seconds", _ints(0, 86_400)),
        ("queue_backlog.queues", _str_set(SCHEDULER_QUEUES)),
    )
)


def _scheduler(overrides: Any, base: SchedulerThresholds) -> SchedulerThresholds | None:
    """The scheduler block merged over ``base`` (None when the profile sets none of it)."""
    groups: dict[str, dict[str, Any]] = {}
    for rule in _SCHEDULER_RULES:
        value = _given(overrides, rule.path)
        if value is not None:
            group, _, name = rule.path.removeprefix("scheduler.").rpartition(".")
            groups.setdefault(group, {})[name] = rule.check(f"overrides.{rule.path}", value)
    if not groups:
        return None
    nested = {g: dataclasses.replace(getattr(base, g), **v) for g, v in groups.items() if g}
    return dataclasses.replace(base, **groups.get("", {}), **nested)


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


def _given(overrides: Any, path: str) -> Any:
    """The value at ``path`` in the overrides, or None where it (or a block above it) is absent."""
    value = overrides
    for part in path.split("."):
        value = getattr(value, part)
        if value is None:
            return None
    return value


def resolve(profile: Profile) -> Resolved:
    """Validate ``profile`` and merge it over its base; raises the first ProfileError."""
    base = _header(profile)
    overrides = profile.overrides
    if overrides is None:
        return base
    merged: dict[str, Any] = {}
    for name, rule in _RULES:
        value = _given(overrides, rule.path)
        if value is not None:
            merged[name] = rule.check(f"overrides.{rule.path}", value)
        below = _AT_LEAST.get(name)
        if below is not None:
            low = merged.get(below, getattr(base, below))
            high = merged.get(name, getattr(base, name))
            if high < low:
                raise ProfileError(
                    f"overrides.{rule.path.rpartition('.')[0]}",
                    f"{rust_float(high)} must be >= {rust_float(low)}",
                )
        above = _BELOW.get(name)
        if above is not None:
            value = merged.get(name, getattr(base, name))
            limit = merged.get(above, getattr(base, above))
            if value >= limit:
                raise ProfileError(
                    f"overrides.{rule.path}",
                    f"{value} must be < {above.removeprefix('dns_')} {limit}",
                )
    scheduler = _scheduler(overrides, base.scheduler)
    if scheduler is not None:
        merged["scheduler"] = scheduler
    return dataclasses.replace(base, **merged)
