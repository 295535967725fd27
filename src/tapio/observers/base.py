"""What every observer provides to the agent's pipeline.

An observer owns one BPF object (``<object_name>.bpf.o``) with an ``events`` ring buffer of one
fixed-size record type. The agent drains the ring in batches and hands the observer a payload of
back-to-back records; ``classify`` turns them into occurrences. Observers that also watch
non-BPF kernel facts (PSI, cgroup files) implement ``run``, which emits through the same path.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from tapio.bpf.abi import CStruct
from tapio.bpf.loader import BpfObject
from tapio.occurrence import Occurrence

Emit = Callable[[Sequence[Occurrence]], Awaitable[None]]


@dataclass
class ObserverContext:
    """Process-wide facts an observer may need; never a back-reference into the pipeline."""

    boot_offset_ns: int  # wall clock minus CLOCK_MONOTONIC, computed once at start
    node_name: str = "unknown-node"
    settings: dict[str, object] = field(default_factory=dict)


@dataclass
class Capability:
    name: str
    available: bool
    detail: str = ""


class Observer(abc.ABC):
    name: ClassVar[str]
    object_name: ClassVar[str]
    record: ClassVar[CStruct]
    ring_map: ClassVar[str] = "events"
    # Observer-specific tapio_metrics indices → (metric kind, reason); kind is "kernel_drop" or
    # "correlation_drop".
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {}

    def __init__(self, ctx: ObserverContext) -> None:
        self.ctx = ctx
        self.degraded_reasons: list[str] = []

    def attach(self, obj: BpfObject) -> None:
        """Attach the object's programs (default: all of them, by section name)."""
        obj.attach_all()

    def capabilities(self) -> list[Capability]:
        return []

    @abc.abstractmethod
    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        """Decode back-to-back records and return the anomalies among them."""

    async def run(self, emit: Emit) -> None:  # noqa: B027 - optional hook
        """Long-running side task for non-BPF facts; returns when there is nothing to do."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``attach`` or ``run`` opened beyond the BPF object."""
