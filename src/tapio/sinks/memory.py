"""In-memory sink: keeps what it receives, and behaves as a handler says.

Tests (and anything embedding the pipeline) use it instead of hand-written fake sinks, so a
fake can never drift from the sink contract: it *is* a :class:`~tapio.sinks.base.BatchWriterSink`
with the real counters. Like a mock transport in an HTTP client, the behaviour of each write is
a function of the batch: ``handler`` may record, inspect, sleep, or raise -- an exception makes
the write fail and is counted as a ``write_error`` drop; :class:`~tapio.sinks.base.SinkError`
with ``written=k`` makes it a partial write of the first ``k``.

``hold`` keeps the sink from consuming anything until the event is set (a stalled sink), and
``healthy`` is what the agent's readiness and the controller heartbeat read.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import ClassVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from tapio.occurrence import Occurrence
from tapio.sinks.base import Batch, BatchWriterSink, SinkError

Handler = Callable[[Batch], Awaitable[None] | None]


class MemorySink(BatchWriterSink):
    """Records every delivered occurrence in order (see the module docs)."""

    name: ClassVar[str] = "memory"

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        label: str | None = None,
        hold: anyio.Event | None = None,
        healthy: bool = True,
    ) -> None:
        super().__init__(label)
        self.handler = handler
        self.hold = hold
        #: Read by readiness and heartbeats, like a network sink's health.
        self.healthy = healthy
        #: The batches whose write succeeded (a partial write keeps its written prefix).
        self.batches: list[list[Occurrence]] = []
        self.occurrences: list[Occurrence] = []
        self.closed = False
        self._grew: anyio.Event | None = None

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await super().run(batches)

    async def write(self, batch: Batch) -> None:
        try:
            if self.handler is not None:
                result = self.handler(batch)
                if inspect.isawaitable(result):
                    await result
        except SinkError as exc:
            self._keep(list(batch[: exc.written]))
            raise
        self._keep(list(batch))

    def _keep(self, items: list[Occurrence]) -> None:
        if items:
            self.batches.append(items)
            self.occurrences.extend(items)
            if self._grew is not None:
                self._grew.set()

    async def close(self) -> None:
        self.closed = True

    async def wait_for(self, n: int, within: float = 5.0) -> list[Occurrence]:
        """Wait until at least ``n`` occurrences were delivered (``TimeoutError`` otherwise)."""
        with anyio.fail_after(within):
            while len(self.occurrences) < n:
                self._grew = anyio.Event()
                await self._grew.wait()
        return self.occurrences
