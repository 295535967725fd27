"""tapio-wire/v1: every message between agent and controller as msgspec Structs.

Both directions stay compatible with peers of other versions of the protocol:

* Unknown JSON fields are ignored (forward compatibility); missing required fields and wrong
  types fail decoding and surface as ``MALFORMED_JSON``.
* Enumerations that a newer peer may extend have a catch-all: an unknown observer status,
  event severity or degraded reason decodes as ``unknown`` instead of failing the payload.
* The reasoning-field scan descends into arrays as well as objects; the reported path is
  ``$.a[2].root_cause``. Keys are visited in sorted order, so the first hit, and so the
  message, does not depend on the order a peer serialized its keys in.
* Additive fields only: ``AgentStatus.reported_config_hash`` and
  ``StatusResponse.stale_agents`` / ``unconverged_agents``; ``CompiledConfig`` may carry Tapio's
  extra knobs, which are omitted when default (see :mod:`tapio.profile.compiled`).

``validate()`` methods raise :class:`WireError`, which carries the HTTP status, the error code
and the message (docs/wire.md, errors), ready for the ``{"error":{"code","message"}}`` envelope.
"""

from __future__ import annotations

import enum
import operator
from typing import Annotated, Any, ClassVar, Final, Self, TypeVar

import msgspec

from tapio.profile.compiled import EXIT_SCOPES, CompiledConfig
from tapio.reasoning import find_reasoning_field, kernel_events_without_reasoning

WIRE_VERSION: Final = "tapio-wire/v1"
MAX_BODY_BYTES: Final = 262_144
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# msgspec cannot express a uint64 upper bound; u64 fields are bounded in __post_init__ so an
# out-of-range number fails decoding like any other wrong type.
U64 = Annotated[int, msgspec.Meta(ge=0)]


class WireError(Exception):
    """A request the controller refuses (or a response the agent refuses), with its HTTP face."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def unsupported_version(cls, version: str) -> WireError:
        return cls(400, "UNSUPPORTED_VERSION", f"unsupported wire version {version}")

    @classmethod
    def missing_field(cls, field: str) -> WireError:
        return cls(400, "MISSING_FIELD", f"{field} is required")

    @classmethod
    def invalid_field(cls, field: str, reason: str) -> WireError:
        return cls(400, "INVALID_FIELD", f"{field}: {reason}")

    @classmethod
    def reasoning_field(cls, path: str) -> WireError:
        return cls(422, "REASONING_FIELD", f"event facts contain reasoning field {path}")

    @classmethod
    def malformed_json(cls, detail: str) -> WireError:
        return cls(400, "MALFORMED_JSON", detail)

    @classmethod
    def payload_too_large(cls, limit: int = MAX_BODY_BYTES) -> WireError:
        return cls(413, "PAYLOAD_TOO_LARGE", f"request body exceeds {limit} bytes")

    @classmethod
    def unknown_endpoint(cls) -> WireError:
        return cls(404, "UNKNOWN_ENDPOINT", "unknown tapio-controller endpoint")

    @classmethod
    def method_not_allowed(cls, method: str, allowed: str) -> WireError:
        return cls(405, "METHOD_NOT_ALLOWED", f"method {method} not allowed; allowed: {allowed}")

    @classmethod
    def internal(cls) -> WireError:
        return cls(500, "INTERNAL_ERROR", "internal controller error")

    def envelope(self) -> ErrorEnvelope:
        return ErrorEnvelope(error=ErrorBody(code=self.code, message=self.message))


class _Msg(msgspec.Struct, kw_only=True):
    pass


class ErrorBody(_Msg):
    code: str
    message: str


class ErrorEnvelope(_Msg):
    error: ErrorBody


class _OpenEnum(enum.Enum):
    """A wire enum that decodes a value it does not know as its ``UNKNOWN`` member.

    Peers may be newer than this build; an unknown status, severity or reason is kept as
    ``unknown`` instead of rejecting the whole message.
    """

    @classmethod
    def _missing_(cls, value: object) -> Self:
        return cls.__members__["UNKNOWN"]


class ObserverStatus(_OpenEnum):
    RUNNING = "running"
    DISABLED = "disabled"
    DEGRADED = "degraded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class EventSeverity(_OpenEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"
    UNKNOWN = "unknown"


class DegradedReason(_OpenEnum):
    UNCONFIGURED = "unconfigured"
    CONFIG_ABI_MISMATCH = "config_abi_mismatch"
    PMC_UNSUPPORTED = "pmc_unsupported"
    #: the kernel lacks a hook, helper or map type one anomaly type needs (``no_<capability>``)
    KERNEL_UNSUPPORTED = "kernel_unsupported"
    OBSERVER_FAILED = "observer_failed"
    SINK_FAILING = "sink_failing"
    UNKNOWN = "unknown"


def _required(obj: msgspec.Struct, *names: str) -> None:
    for name in names:
        if not getattr(obj, name).strip():
            raise WireError.missing_field(name)


def _positive(field: str, value: int) -> None:
    if value == 0:
        raise WireError.invalid_field(field, "must be greater than zero")


def _check_version(version: str) -> None:
    if version != WIRE_VERSION:
        raise WireError.unsupported_version(version)


def _bound_u64(obj: msgspec.Struct, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value > U64_MAX:
            raise ValueError(f"`{name}` exceeds the u64 range")


# ---------------------------------------------------------------------------------------------
# Registration


class HelloRequest(_Msg):
    wire_version: str
    agent_id: str
    node_name: str
    tapio_version: str
    kernel_release: str
    arch: str
    capabilities: list[str] = msgspec.field(default_factory=list)
    object_sizes: dict[str, U64] = msgspec.field(default_factory=dict)
    map_counts: dict[str, U64] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in (self.object_sizes, self.map_counts):
            if any(v > U64_MAX for v in table.values()):
                raise ValueError("a size or count exceeds the u64 range")

    def validate(self) -> None:
        _check_version(self.wire_version)
        _required(self, "agent_id", "node_name", "tapio_version", "kernel_release", "arch")


class HelloResponse(_Msg):
    wire_version: str
    accepted: bool
    controller_id: str
    config_version: str
    send_interval_ms: U64
    max_batch_events: U64

    def __post_init__(self) -> None:
        _bound_u64(self, "send_interval_ms", "max_batch_events")

    def validate(self) -> None:
        _check_version(self.wire_version)
        _required(self, "controller_id", "config_version")
        _positive("send_interval_ms", self.send_interval_ms)
        _positive("max_batch_events", self.max_batch_events)


# ---------------------------------------------------------------------------------------------
# Configuration


class Batching(_Msg):
    send_interval_ms: U64
    max_batch_events: U64

    def __post_init__(self) -> None:
        _bound_u64(self, "send_interval_ms", "max_batch_events")


class ConfigResponse(_Msg, kw_only=True):
    wire_version: str
    version: str
    config_hash: str = ""
    config: CompiledConfig
    batching: Batching

    def validate(self) -> None:
        """Version, required fields, hash syntax, exit scope; an empty hash is left for the agent
        to refuse."""
        _check_version(self.wire_version)
        _required(self, "version")
        storage = self.config.storage
        _positive("config.storage.slow_io_warning_ns", storage.slow_io_warning_ns)
        _positive("config.storage.slow_io_critical_ns", storage.slow_io_critical_ns)
        net = self.config.network
        # the agent's thresholds take milliseconds within the profile's ranges
        timeout_ms, slow_ms = net.dns_timeout_ns // 1_000_000, net.dns_slow_ns // 1_000_000
        if not 100 <= timeout_ms <= 60_000:
            raise WireError.invalid_field("config.network.dns_timeout_ns", "out of range")
        if not 1 <= slow_ms < timeout_ms:
            message = "must be >= 1 ms and below dns_timeout_ns"
            raise WireError.invalid_field("config.network.dns_slow_ns", message)
        if net.dns_window_ns // 1_000_000 > 600_000:
            raise WireError.invalid_field("config.network.dns_window_ns", "out of range")
        if not 1 <= net.dns_cap <= 100_000:
            raise WireError.invalid_field("config.network.dns_cap", "out of range")
        scope = self.config.container.exit_scope
        if scope not in EXIT_SCOPES:
            raise WireError.invalid_field("config.container.exit_scope", f"unknown scope {scope!r}")
        _positive("batching.send_interval_ms", self.batching.send_interval_ms)
        _positive("batching.max_batch_events", self.batching.max_batch_events)

    def generation(self) -> int:
        """``version`` as the u32 generation stamped into events; INVALID_FIELD otherwise."""
        text = self.version.strip()
        if not text.isascii() or not text.isdigit() or int(text) > 0xFFFF_FFFF:
            raise WireError.invalid_field("version", "must be a u32 generation number")
        return int(text)


# ---------------------------------------------------------------------------------------------
# Heartbeat


class AgentCounters(_Msg):
    events_total: U64
    malformed_events_total: U64
    lost_events_total: U64
    correlation_drops_total: U64
    sink_drops_total: U64
    controller_send_failures_total: U64

    def __post_init__(self) -> None:
        _bound_u64(
            self,
            "events_total",
            "malformed_events_total",
            "lost_events_total",
            "correlation_drops_total",
            "sink_drops_total",
            "controller_send_failures_total",
        )


def zero_counters() -> AgentCounters:
    return AgentCounters(
        events_total=0,
        malformed_events_total=0,
        lost_events_total=0,
        correlation_drops_total=0,
        sink_drops_total=0,
        controller_send_failures_total=0,
    )


class HeartbeatRequest(_Msg, kw_only=True):
    wire_version: str
    agent_id: str
    node_name: str
    config_version: str
    config_hash: str = ""
    uptime_seconds: U64
    observers: dict[str, ObserverStatus]
    counters: AgentCounters
    degraded_reasons: list[DegradedReason] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        _bound_u64(self, "uptime_seconds")

    def validate(self) -> None:
        _check_version(self.wire_version)
        _required(self, "agent_id", "node_name", "config_version")
        if not self.observers:
            raise WireError.missing_field("observers")


class HeartbeatResponse(_Msg):
    wire_version: str
    accepted: bool
    next_config_version: str

    def validate(self) -> None:
        _check_version(self.wire_version)
        _required(self, "next_config_version")


# ---------------------------------------------------------------------------------------------
# Events


class WireEvent(_Msg):
    """One event of a batch. Its timestamp's u64 bound is checked by the batch that holds it,
    in one pass over all of them, not by a Python call per event."""

    type: str
    timestamp_unix_nanos: U64
    observer: str
    severity: EventSeverity
    facts: Any = None

    def validate(self) -> None:
        _required(self, "type", "observer")
        if not self.type.startswith("kernel."):
            raise WireError.invalid_field("type", "must be a kernel.* event")
        path = find_reasoning_field(self.facts)
        if path is not None:
            raise WireError.reasoning_field(path)


class EventBatchRequest(_Msg):
    wire_version: str
    agent_id: str
    node_name: str
    sequence: U64
    sent_at_unix_nanos: U64
    events: list[WireEvent]

    #: What decoding proved of every event's facts (:mod:`tapio.controller.batch`): nothing
    #: (""), an object of scalars ("flat"), or one with no reasoning key either ("clean").
    facts_proven: ClassVar[str] = ""

    def __post_init__(self) -> None:
        events = self.events
        if events and max(map(_TIMESTAMP, events)) > U64_MAX:
            first = next(i for i, e in enumerate(events) if e.timestamp_unix_nanos > U64_MAX)
            # The message decoding a lone event gives, with the event's place in the batch.
            raise msgspec.ValidationError(
                f"`timestamp_unix_nanos` exceeds the u64 range - at `$.events[{first}]`"
            )
        _bound_u64(self, "sequence", "sent_at_unix_nanos")

    def validate(self, max_batch_events: int) -> None:
        _check_version(self.wire_version)
        _required(self, "agent_id", "node_name")
        if not self.events:
            raise WireError.missing_field("events")
        if len(self.events) > max_batch_events:
            raise WireError.invalid_field("events", "batch exceeds max_batch_events")
        if kernel_events_without_reasoning(self.events, self.facts_proven):
            return
        for event in self.events:  # some event fails (or is not flat): the first error, exactly
            event.validate()


_TIMESTAMP: Final = operator.attrgetter("timestamp_unix_nanos")


class EventBatchResponse(_Msg):
    wire_version: str
    accepted: U64
    rejected: U64
    next_config_version: str


# ---------------------------------------------------------------------------------------------
# Status (controller introspection)


class StatusConfig(_Msg):
    version: str
    config_hash: str


class StatusTotals(_Msg):
    accepted_events_total: U64
    rejected_events_total: U64
    batches_accepted_total: U64
    batches_rejected_total: U64


class SequenceStatus(_Msg):
    last_seen: U64 | None
    gaps_total: U64
    regressions_total: U64


class AgentStatus(_Msg, kw_only=True):
    agent_id: str
    node_name: str
    tapio_version: str
    registered_at_unix: U64
    last_heartbeat_age_seconds: U64 | None
    reported_config_version: str
    reported_config_hash: str = ""
    reported_counters: AgentCounters
    observers: dict[str, ObserverStatus]
    sequence: SequenceStatus


class StatusResponse(_Msg):
    wire_version: str
    controller_id: str
    started_at_unix: U64
    config: StatusConfig
    totals: StatusTotals
    agents: list[AgentStatus]
    stale_agents: list[str] = msgspec.field(default_factory=list)
    unconverged_agents: list[str] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Codec helpers

T = TypeVar("T")

_ENCODER: Final = msgspec.json.Encoder()
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(msg: Any) -> bytes:
    """Compact JSON of any wire message (field order as declared)."""
    return _ENCODER.encode(msg)


def decode(raw: bytes | str, type: type[T]) -> T:
    """Decode ``raw`` as ``type``; any decoding failure becomes ``MALFORMED_JSON``.

    Does not call ``validate()``: the caller knows the context (e.g. ``max_batch_events``).
    """
    decoder = _DECODERS.get(type)
    if decoder is None:
        decoder = _DECODERS.setdefault(type, msgspec.json.Decoder(type))
    try:
        result: T = decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise WireError.malformed_json(f"Failed to parse the request body as JSON: {exc}") from None
    except UnicodeDecodeError:  # msgspec lets invalid UTF-8 inside strings escape as this
        raise WireError.malformed_json("request body is not valid UTF-8") from None
    except RecursionError:
        raise WireError.malformed_json("JSON nested too deeply") from None
    return result
