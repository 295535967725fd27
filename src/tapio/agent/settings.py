"""The agent's TOML configuration: ``[thresholds]``, ``[container]``, ``[agent]``, sinks, metrics.

A missing file means all defaults; unknown keys are ignored (forward compatibility); a parse
error or a value of the wrong type stops the agent with the offending key in the message.
Standalone mode turns these values into the kernel ``tapio_config``; in controller mode the
kernel thresholds come from the controller's compiled profile instead.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import msgspec

from tapio.sinks.file import FileSinkSettings
from tapio.thresholds import ExitScope, PosInt, Thresholds

PosSecs = Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)]


class ContainerSettings(msgspec.Struct, kw_only=True):
    exit_scope: ExitScope = "auto"
    ignore_exit_codes: list[int] = []
    ignore_signals: list[int] = []


class AgentSection(msgspec.Struct, kw_only=True):
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


class AgentSettings(msgspec.Struct, kw_only=True):
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    container: ContainerSettings = msgspec.field(default_factory=ContainerSettings)
    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    file: FileSinkSettings = msgspec.field(default_factory=FileSinkSettings)
    metrics: dict[str, object] = {}
    otlp: dict[str, object] = {}
    http: dict[str, object] = {}


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


def parse_settings(doc: dict[str, object], origin: str = "<config>") -> AgentSettings:
    try:
        settings = msgspec.convert(doc, AgentSettings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid config {origin}: {exc}") from exc
    # The exit scope is configured in [container]; the thresholds carry it to the observers.
    settings.thresholds = msgspec.structs.replace(
        settings.thresholds, exit_scope=settings.container.exit_scope
    )
    return settings
