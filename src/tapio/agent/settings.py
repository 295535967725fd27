"""The agent's TOML configuration: ``[thresholds]``, ``[container]``, ``[agent]``, sinks, metrics.

A missing file means all defaults. An unknown section or key (a typo like ``endpiont``) is an
error naming the key and its section, as is a parse error or a value of the wrong type: a
setting that is silently ignored is worse than an agent that does not start.
Standalone mode turns these values into the kernel ``tapio_config``; in controller mode the
kernel thresholds come from the controller's compiled profile instead.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Final

import msgspec

from tapio.sinks.file import FileSinkSettings
from tapio.thresholds import ExitScope, PosInt, Thresholds

PosSecs = Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)]


#: The default ``/metrics`` port: OpenTelemetry's Prometheus-exporter port, so that the agent
#: never collides with a Prometheus server's own 9090 on the same host (hostNetwork pods).
DEFAULT_METRICS_PORT: Final = 9464


class ContainerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    exit_scope: ExitScope = "auto"
    ignore_exit_codes: list[int] = []
    ignore_signals: list[int] = []


class AgentSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: How often the ring buffers are drained when no forced wakeup arrives.
    drain_interval_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 100
    #: Records taken from one ring per drain pass before yielding (counted when hit).
    max_drain_per_tick: PosInt = 4096
    #: SIGTERM/SIGINT: time allowed to flush every sink before exiting anyway.
    shutdown_grace_secs: PosSecs = 5.0
    #: Bound of each observer's classification channel and each sink's stream (in batches).
    channel_batches: PosInt = 64
    #: Interval of reading the BPF metrics maps (lost events, ABI mismatch, drops).
    kernel_metrics_interval_secs: PosSecs = 5.0
    observers: list[str] = msgspec.field(default_factory=list)  # empty: every installed one
    #: Run with the observers that started when another cannot (default: exit 1 and say which).
    allow_degraded: bool = False
    #: Observer -> its ring buffer's size in KiB (a power of two, 4 KiB to 512 MiB); an observer
    #: not named keeps its object's size (network 2 MiB, container 256 KiB, storage 512 KiB).
    ring_kib: dict[str, PosInt] = {}

    def __post_init__(self) -> None:
        for name, kib in self.ring_kib.items():
            if kib < 4 or kib > 1 << 19 or kib & (kib - 1):
                raise ValueError(f"agent.ring_kib.{name} must be a power of two in [4, 524288]")


class MetricsServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``[metrics]`` TOML section: ``enabled``, ``port``, ``bind_address`` and the limits."""

    enabled: bool = False
    #: TCP port; 0 picks a free port (tests).
    port: int = DEFAULT_METRICS_PORT
    #: An IP literal, IPv4 or IPv6 (``"::1"``, ``"::"``).
    bind_address: str = "127.0.0.1"
    #: Idle keep-alive connections, and connections that never finish sending their request
    #: headers, are closed after this many seconds.
    keepalive_timeout_secs: float = 5.0
    #: A connection serving its last response is force-closed after at most this long.
    shutdown_timeout_secs: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("metrics.port must be in 0..65535")
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ValueError(
                f"metrics.bind_address must be an IP address, got {self.bind_address!r}"
            ) from None
        if not 0 < self.keepalive_timeout_secs <= 300:
            raise ValueError("metrics.keepalive_timeout_secs must be in (0, 300]")
        if not 0 < self.shutdown_timeout_secs <= 60:
            raise ValueError("metrics.shutdown_timeout_secs must be in (0, 60]")


class AgentSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    container: ContainerSettings = msgspec.field(default_factory=ContainerSettings)
    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    file: FileSinkSettings = msgspec.field(default_factory=FileSinkSettings)
    metrics: MetricsServerSettings = msgspec.field(default_factory=MetricsServerSettings)
    #: Kept as written: the OTLP sink merges them with the ``OTEL_*`` environment (TOML wins).
    otlp: dict[str, object] = {}
    http: dict[str, object] = {}


#: Sections whose keys are checked against the sink's settings Struct without building the sink
#: (that module is imported only when the section is present).
_SINK_SECTIONS: Final = {
    "otlp": ("tapio.sinks.otlp_config", "OtlpSettings"),
    "http": ("tapio.sinks.http", "HttpSinkSettings"),
}


class SettingsError(ValueError):
    pass


def load_settings(path: str | Path | None) -> AgentSettings:
    """Read the TOML file; a missing file is all defaults."""
    if path is None:
        return AgentSettings()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return AgentSettings()
    except OSError as exc:
        raise SettingsError(f"cannot read config {p}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"invalid TOML in {p}: {exc}") from exc
    return parse_settings(doc, str(p))


_UNKNOWN = re.compile(
    r"^Object contains unknown field `(?P<key>[^`]*)`(?: - at `\$\.(?P<at>[^`]*)`)?$"
)


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with an unknown field said in the file's own words (key, section)."""
    m = _UNKNOWN.match(str(exc))
    if m is None:
        return str(exc)
    if m["at"] is None:
        return f"unknown section [{m['key']}]"
    return f"unknown key {m['key']!r} in section [{m['at']}]"


def parse_settings(doc: dict[str, object], origin: str = "<config>") -> AgentSettings:
    try:
        settings = msgspec.convert(doc, AgentSettings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid config {origin}: {_explain(exc)}") from exc
    for section, (module, cls) in _SINK_SECTIONS.items():
        keys = getattr(settings, section)
        if keys:
            known = getattr(importlib.import_module(module), cls).__struct_fields__
            unknown = sorted(str(k) for k in keys if k not in known)
            if unknown:
                raise SettingsError(
                    f"invalid config {origin}: unknown key {unknown[0]!r} in section [{section}] "
                    f"(known: {', '.join(sorted(known))})"
                )
    # The exit scope is configured in [container]; the thresholds carry it to the observers.
    settings.thresholds = msgspec.structs.replace(
        settings.thresholds, exit_scope=settings.container.exit_scope
    )
    return settings
