"""The controller's active configuration and its reload rules.

One :class:`ActiveConfig` is served to every agent; its ConfigResponse body is encoded once per
generation so the hot ``GET /v1/agents/config`` path only copies bytes.

Reload (file poll or SIGHUP): the profile is re-read, validated and compiled. A bad profile is
refused with a logged reason and the previous config keeps being served. A good profile bumps
the generation only when its compiled config (hence its hash) changed: an edited comment does
not make every agent re-fetch an identical config. The ``scheduler`` block is the controller's
own (its scheduler judges read it) and is not part of the compiled config: a change there is
applied without bumping the generation the agents see.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tapio import wire
from tapio.profile import (
    DEFAULT_PROFILE_YAML,
    CompiledConfig,
    ProfileError,
    SchedulerThresholds,
    compile_profile,
    config_hash,
    load_profile,
    scheduler_thresholds,
)

SEND_INTERVAL_MS: Final = 1000
MAX_BATCH_EVENTS: Final = 256
MAX_GENERATION: Final = 0xFFFF_FFFF
DEFAULT_SCHEDULER: Final = SchedulerThresholds()


@dataclass(frozen=True, slots=True)
class ActiveConfig:
    generation: int
    compiled: CompiledConfig
    config_hash: str
    batching: wire.Batching
    response_body: bytes
    scheduler: SchedulerThresholds = DEFAULT_SCHEDULER

    @property
    def version(self) -> str:
        return str(self.generation)

    @property
    def etag(self) -> str:
        return f'"{self.config_hash}"'

    @classmethod
    def build(
        cls,
        generation: int,
        compiled: CompiledConfig,
        scheduler: SchedulerThresholds | None = None,
    ) -> ActiveConfig:
        batching = wire.Batching(
            send_interval_ms=SEND_INTERVAL_MS, max_batch_events=MAX_BATCH_EVENTS
        )
        digest = config_hash(compiled)
        body = wire.encode(
            wire.ConfigResponse(
                wire_version=wire.WIRE_VERSION,
                version=str(generation),
                config_hash=digest,
                config=compiled,
                batching=batching,
            )
        )
        return cls(generation, compiled, digest, batching, body, scheduler or DEFAULT_SCHEDULER)


class ReloadResult(enum.Enum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    result: ReloadResult
    reason: str = ""
    previous_hash: str = ""


def _read(path: Path) -> bytes:
    from tapio.profile.loader import read_profile_file

    return read_profile_file(path)


def compile_source(source: bytes) -> tuple[CompiledConfig, SchedulerThresholds]:
    profile = load_profile(text=source)
    return compile_profile(profile), scheduler_thresholds(profile)


class ConfigStore:
    """Owns the active config; ``reload`` never raises for a bad profile."""

    def __init__(self, profile_path: str | os.PathLike[str] | None) -> None:
        self.profile_path = Path(profile_path) if profile_path is not None else None
        source = _read(self.profile_path) if self.profile_path else DEFAULT_PROFILE_YAML.encode()
        self.active = ActiveConfig.build(1, *compile_source(source))  # ProfileError aborts start
        self._source = source
        self._rejected_source: bytes | None = None

    def read_source(self) -> bytes:
        """The profile's current bytes (blocking I/O: call from a worker thread)."""
        if self.profile_path is None:
            return self._source
        return _read(self.profile_path)

    def apply_source(self, source: bytes | ProfileError, *, force: bool) -> ReloadOutcome:
        """Consider new profile bytes (or the error reading them).

        Unless ``force`` (SIGHUP), bytes already seen (applied or refused) are skipped so a bad
        file is reported once, not every poll.
        """
        if isinstance(source, ProfileError):
            return ReloadOutcome(ReloadResult.FAILED, str(source))
        if not force and (source == self._source or source == self._rejected_source):
            return ReloadOutcome(ReloadResult.UNCHANGED)
        try:
            compiled, scheduler = compile_source(source)
        except ProfileError as exc:
            self._rejected_source = source
            return ReloadOutcome(ReloadResult.FAILED, str(exc))
        self._source = source
        self._rejected_source = None
        previous = self.active
        if config_hash(compiled) == previous.config_hash:
            if scheduler == previous.scheduler:
                return ReloadOutcome(ReloadResult.UNCHANGED, previous_hash=previous.config_hash)
            self.active = dataclasses.replace(previous, scheduler=scheduler)
            return ReloadOutcome(ReloadResult.APPLIED, previous_hash=previous.config_hash)
        generation = previous.generation + 1 if previous.generation < MAX_GENERATION else 1
        self.active = ActiveConfig.build(generation, compiled, scheduler)
        return ReloadOutcome(ReloadResult.APPLIED, previous_hash=previous.config_hash)

    def reload_now(self, *, force: bool) -> ReloadOutcome:
        """Synchronous reload (tests, SIGHUP handler when blocking I/O is acceptable)."""
        try:
            source: bytes | ProfileError = self.read_source()
        except ProfileError as exc:
            source = exc
        return self.apply_source(source, force=force)
