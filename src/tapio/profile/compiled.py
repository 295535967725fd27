"""The compiled configuration: what the controller serves and the agent turns into BPF bytes.

This module is deliberately light (msgspec only, no YAML, hashlib imported on demand) because
the node agent decodes ``ConfigResponse.config`` into these Structs and must not pay for the
profile loader.

Declared field order is the hashing order. The protocol's original fields are required and
always encoded. Fields added later all carry defaults, and ``omit_defaults`` drops them from
the JSON whenever they equal their default ("omit-if-default"): a profile that does not touch
the newer knobs therefore compiles to the same bytes and the same hash as before they existed,
and an older agent or controller never sees a field it does not know. The ``node`` block is
omitted as a whole when it equals its default; when it is present, its default-valued inner
fields are omitted by the same rule.

Every default value comes from :data:`tapio.thresholds.DEFAULTS`, converted to wire units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec

from tapio.thresholds import DEFAULTS, EXIT_SCOPES

if TYPE_CHECKING:
    from tapio.profile.validate import Resolved

U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
# msgspec bounds must fit an int64; every compiled u64 (nanoseconds derived from bounded
# profile ranges) is far below 2**63, so the tighter bound loses nothing.
U64 = Annotated[int, msgspec.Meta(ge=0, le=0x7FFF_FFFF_FFFF_FFFF)]
I32 = Annotated[int, msgspec.Meta(ge=-0x8000_0000, le=0x7FFF_FFFF)]
Signal = Annotated[int, msgspec.Meta(ge=1, le=64)]


_D: Final = DEFAULTS
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


__all__ = ["EXIT_SCOPES"]


def round_half_away(value: float) -> int:
    """Round half away from zero (Python's ``round`` is banker's rounding)."""
    whole = int(value // 1)
    if value - whole >= 0.5:
        whole += 1
    return whole


def permille(pct: float) -> int:
    """Percent to the wire's integer permille."""
    return round_half_away(pct * 10.0)


def _adopt_defaults(obj: msgspec.Struct) -> None:
    """Swap field values equal to their default for the default object itself.

    msgspec's ``omit_defaults`` tests identity (plus empty collections), so an equal but
    distinct ``1_000_000_000`` would be encoded. Running this in ``__post_init__`` (on
    construction and on decode) makes every encoding of a config omit-if-default.
    """
    for field in msgspec.structs.fields(obj):
        default = field.default
        if default is msgspec.NODEFAULT:
            continue
        value = getattr(obj, field.name)
        if value is not default and type(value) is type(default) and value == default:
            setattr(obj, field.name, default)


class _Block(msgspec.Struct, omit_defaults=True, kw_only=True):
    def __post_init__(self) -> None:
        _adopt_defaults(self)


class NetworkConfig(_Block):
    enabled: bool
    rtt_spike_ratio: U32
    rtt_spike_abs_us: U32
    rtt_min_baseline_samples: U32
    conn_refused_window_ns: U64
    conn_refused_min_count: U32
    # Tapio additions (omit-if-default).
    retransmit_threshold: U32 = _D.retransmit_threshold
    retransmit_window_ns: U64 = _D.retransmit_window_ms * 1_000_000
    rtt_min_delta_us: U32 = _D.rtt_min_delta_us
    rtt_sample_interval_us: U32 = _D.rtt_sample_interval_us
    dns_enabled: bool = _D.dns_enabled
    # a tuple, so the default is one immutable object that omit-if-default can recognise
    dns_ports: Annotated[tuple[Port, ...], msgspec.Meta(min_length=1, max_length=8)] = _D.dns_ports
    dns_timeout_ns: U64 = _D.dns_timeout_ms * 1_000_000
    dns_slow_ns: U64 = _D.dns_slow_ms * 1_000_000
    dns_include_nxdomain: bool = _D.dns_include_nxdomain
    dns_window_ns: U64 = _D.dns_window_ms * 1_000_000
    dns_cap: U32 = _D.dns_cap


class StorageConfig(_Block):
    enabled: bool
    slow_io_warning_ns: U64
    slow_io_critical_ns: U64


class ContainerConfig(_Block):
    enabled: bool
    ignore_exit_codes: list[I32]
    # Tapio additions (omit-if-default). exit_scope stays a plain string on the wire so that a
    # newer controller's value cannot make an older agent reject the whole config;
    # ConfigResponse.validate() checks it against EXIT_SCOPES.
    exit_scope: str = "auto"
    ignore_signals: Annotated[list[Signal], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=list
    )


class NodePmcConfig(_Block):
    enabled: bool
    stall_warning_permille: U32
    stall_critical_permille: U32
    ipc_degradation_milli: U32


class NodeConfig(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    """PSI / run-queue / throttling thresholds of the node observer (Tapio addition)."""

    enabled: bool = True
    memory_some_permille: U32 = permille(_D.memory_some_pct)
    memory_full_permille: U32 = permille(_D.memory_full_pct)
    cpu_some_permille: U32 = permille(_D.cpu_some_pct)
    runq_latency_ns: U64 = _D.runq_latency_ms * 1_000_000
    throttle_permille: U32 = permille(_D.throttle_pct)
    hysteresis_permille: U32 = permille(_D.hysteresis_pct)
    #: Run-queue sampling (the per-context-switch hook) is opt-in; omitted when off, so the
    #: default config's canonical form and hash are those of agents that predate it.
    runq_sampling: bool = _D.runq_sampling


NODE_DEFAULT: Final = NodeConfig()


def _normalized_node(node: NodeConfig) -> NodeConfig:
    if node is NODE_DEFAULT:
        return node
    if node == NODE_DEFAULT:
        return NODE_DEFAULT
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(node):
        value = getattr(node, field.name)
        values[field.name] = field.default if value == field.default else value
    return NodeConfig(**values)


class CompiledConfig(_Block):
    network: NetworkConfig
    storage: StorageConfig
    container: ContainerConfig
    node_pmc: NodePmcConfig
    node: NodeConfig = NODE_DEFAULT

    def __post_init__(self) -> None:
        # NodeConfig is frozen (it serves as a field default), so it is rebuilt, not patched.
        self.node = _normalized_node(self.node)


def compile_resolved(r: Resolved) -> CompiledConfig:
    """A validated profile (merged over its base) in wire units.

    Infallible by construction: every value was range-checked by :mod:`tapio.profile.validate`,
    and every unit conversion here stays inside the u32/u64 field types for those ranges.
    Deterministic: no clock, no randomness, no dict-order dependence (lists keep the profile's
    first-occurrence order).
    """
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
            runq_sampling=r.runq_sampling,
        ),
    )


_ENCODER: Final = msgspec.json.Encoder()


def _canonical(obj: msgspec.Struct) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(obj):
        value = getattr(obj, field.name)
        if field.default is not msgspec.NODEFAULT and value == field.default:
            continue
        if field.default_factory is not msgspec.NODEFAULT and value == field.default_factory():
            continue
        out[field.encode_name] = _canonical(value) if isinstance(value, msgspec.Struct) else value
    return out


def canonical_json(compiled: CompiledConfig) -> bytes:
    """Compact JSON in declared field order, new fields omitted when equal to their default.

    Walks the Structs with value equality rather than trusting ``omit_defaults`` so the bytes
    (and so the hash) cannot depend on how, or whether, a field was mutated after construction.
    """
    return _ENCODER.encode(_canonical(compiled))


def config_hash(compiled: CompiledConfig) -> str:
    """``"sha256:" + hex(sha256(canonical_json))``: the convergence key agents report back."""
    import hashlib

    return "sha256:" + hashlib.sha256(canonical_json(compiled)).hexdigest()


def production_default() -> CompiledConfig:
    """The built-in ``production-default`` base, compiled (a fresh, independently mutable copy)."""
    return CompiledConfig(
        network=NetworkConfig(
            enabled=True,
            rtt_spike_ratio=_D.rtt_spike_ratio,
            rtt_spike_abs_us=_D.rtt_spike_abs_us,
            rtt_min_baseline_samples=_D.rtt_min_baseline_samples,
            conn_refused_window_ns=0,
            conn_refused_min_count=0,
        ),
        storage=StorageConfig(
            enabled=True,
            slow_io_warning_ns=_D.io_latency_warning_ns,
            slow_io_critical_ns=_D.io_latency_critical_ns,
        ),
        container=ContainerConfig(enabled=True, ignore_exit_codes=[]),
        node_pmc=NodePmcConfig(
            enabled=_D.node_pmc_enabled,
            stall_warning_permille=permille(_D.stall_pct_warning),
            stall_critical_permille=permille(_D.stall_pct_critical),
            ipc_degradation_milli=round_half_away(_D.ipc_degradation * 1000.0),
        ),
    )


PRODUCTION_DEFAULT_HASH: Final = (
    "sha256:845b719f50052b222e79a6f0a9e091e4fe5cc62f8049f7a9089cf20175f5ddef"
)
