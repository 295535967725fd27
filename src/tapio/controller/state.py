"""In-memory controller state: the agent registry, per-agent sequences, batch totals.

Bounded: at most ``max_agents`` registrations. When full, a new agent may take the place of
the longest-silent agent only if that one is stale; otherwise the hello is refused (the agent
retries with backoff) rather than silently forgetting a live agent.

Sequences are tracked only for registered agents: a hello resets the tracker anyway, so state
kept for unregistered senders could never be observed and would only be an unbounded map.
Every mutator is called only after the request was fully validated, so a rejected request
cannot change anything here except the rejection totals reported in ``/v1/status``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tapio import wire


@dataclass(slots=True)
class SequenceTracker:
    last_seen: int | None = None
    gaps_total: int = 0
    regressions_total: int = 0

    def observe(self, sequence: int) -> tuple[int, bool]:
        """Advance with ``sequence``; return (missing sequences, was a regression)."""
        if self.last_seen is None:
            self.last_seen = sequence
            return 0, False
        if sequence == self.last_seen + 1:
            self.last_seen = sequence
            return 0, False
        if sequence > self.last_seen + 1:
            gap = sequence - self.last_seen - 1
            self.gaps_total += gap
            self.last_seen = sequence
            return gap, False
        self.regressions_total += 1
        return 0, True


@dataclass(slots=True)
class AgentRecord:
    hello: wire.HelloRequest
    registered_at_unix: int
    registered_mono: float
    sequence: SequenceTracker = field(default_factory=SequenceTracker)
    heartbeat: wire.HeartbeatRequest | None = None
    heartbeat_mono: float | None = None

    def last_activity(self) -> float:
        return self.heartbeat_mono if self.heartbeat_mono is not None else self.registered_mono


@dataclass(slots=True)
class Totals:
    accepted_events_total: int = 0
    rejected_events_total: int = 0
    batches_accepted_total: int = 0
    batches_rejected_total: int = 0


@dataclass(slots=True)
class RegisterResult:
    accepted: bool
    evicted: str | None = None


class ControllerState:
    def __init__(self, *, max_agents: int, stale_after: float) -> None:
        if max_agents < 1:
            raise ValueError("max_agents must be >= 1")
        self.max_agents = max_agents
        self.stale_after = stale_after
        self.agents: dict[str, AgentRecord] = {}
        self.totals = Totals()

    def register(
        self, hello: wire.HelloRequest, *, now_unix: int, now_mono: float
    ) -> RegisterResult:
        evicted: str | None = None
        previous = self.agents.get(hello.agent_id)
        if previous is None and len(self.agents) >= self.max_agents:
            oldest = min(self.agents.values(), key=AgentRecord.last_activity)
            if now_mono - oldest.last_activity() <= self.stale_after:
                return RegisterResult(accepted=False)
            evicted = oldest.hello.agent_id
            del self.agents[evicted]
        record = AgentRecord(hello=hello, registered_at_unix=now_unix, registered_mono=now_mono)
        if previous is not None:
            # A re-hello resets sequence tracking but the last heartbeat still describes the agent.
            record.heartbeat = previous.heartbeat
            record.heartbeat_mono = previous.heartbeat_mono
        self.agents[hello.agent_id] = record
        return RegisterResult(accepted=True, evicted=evicted)

    def heartbeat(self, hb: wire.HeartbeatRequest, *, now_mono: float) -> bool:
        """Store the heartbeat of a registered agent; False (nothing stored) for strangers."""
        record = self.agents.get(hb.agent_id)
        if record is None:
            return False
        record.heartbeat = hb
        record.heartbeat_mono = now_mono
        return True

    def accept_batch(self, batch: wire.EventBatchRequest) -> tuple[int, bool]:
        self.totals.accepted_events_total += len(batch.events)
        self.totals.batches_accepted_total += 1
        record = self.agents.get(batch.agent_id)
        if record is None:
            return 0, False
        return record.sequence.observe(batch.sequence)

    def reject_batch(self, events: int) -> None:
        self.totals.rejected_events_total += events
        self.totals.batches_rejected_total += 1

    def stale_agents(self, now_mono: float) -> list[str]:
        """Registered agents silent for longer than ``stale_after`` (since their last heartbeat,
        or since registration when none arrived yet, so a fresh agent is not born stale)."""
        return sorted(
            agent_id
            for agent_id, record in self.agents.items()
            if now_mono - record.last_activity() > self.stale_after
        )

    def unconverged_agents(self, target_hash: str) -> list[str]:
        """Registered agents whose last heartbeat is missing or reports another config hash."""
        return sorted(
            agent_id
            for agent_id, record in self.agents.items()
            if record.heartbeat is None or record.heartbeat.config_hash != target_hash
        )

    def agent_statuses(self, now_mono: float) -> list[wire.AgentStatus]:
        out: list[wire.AgentStatus] = []
        for agent_id in sorted(self.agents):
            record = self.agents[agent_id]
            hb = record.heartbeat
            age = None
            if record.heartbeat_mono is not None:
                age = max(0, int(now_mono - record.heartbeat_mono))
            out.append(
                wire.AgentStatus(
                    agent_id=agent_id,
                    node_name=record.hello.node_name,
                    tapio_version=record.hello.tapio_version,
                    registered_at_unix=record.registered_at_unix,
                    last_heartbeat_age_seconds=age,
                    reported_config_version=hb.config_version if hb else "",
                    reported_config_hash=hb.config_hash if hb else "",
                    reported_counters=hb.counters if hb else wire.zero_counters(),
                    observers=dict(hb.observers) if hb else {},
                    sequence=wire.SequenceStatus(
                        last_seen=record.sequence.last_seen,
                        gaps_total=record.sequence.gaps_total,
                        regressions_total=record.sequence.regressions_total,
                    ),
                )
            )
        return out
