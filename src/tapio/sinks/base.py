"""The sink contract.

A sink owns its consumption loop: the agent hands it the receiving end of a bounded memory
stream of *batches* and runs ``run()`` in its own task. When the stream closes (shutdown) the sink
drains what is left, flushes, and returns. The agent fans out with ``send_nowait`` and counts a
``queue_full`` drop when a sink falls behind, so no sink can ever stall ring-buffer draining.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from anyio.streams.memory import MemoryObjectReceiveStream

from tapio.metrics import SINK_DROPS, SINK_WRITES
from tapio.occurrence import Occurrence

Batch = Sequence[Occurrence]


class SinkError(Exception):
    """A sink could not deliver a batch (already counted by the sink)."""


class SinkStats:
    """Pre-bound metric children for one sink (label lookups are not free on hot paths)."""

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self._ok = SINK_WRITES.labels(sink=sink, result="ok")
        self._err = SINK_WRITES.labels(sink=sink, result="err")
        self.ok_total = 0
        self.err_total = 0
        self.dropped_total = 0

    def ok(self, n: int = 1) -> None:
        self.ok_total += n
        self._ok.inc(n)

    def err(self, n: int = 1) -> None:
        self.err_total += n
        self._err.inc(n)

    def drop(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped_total += n
            SINK_DROPS.labels(sink=self.sink, reason=reason).inc(n)


class Sink(abc.ABC):
    """Base class: subclasses implement ``run`` (or ``write`` via ``BatchWriterSink``)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.stats = SinkStats(self.name)

    @abc.abstractmethod
    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        """Consume batches until the stream is closed, then flush and return."""


class BatchWriterSink(Sink):
    """A sink that writes each batch as it arrives (stdout, file)."""

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        async with batches:
            async for batch in batches:
                try:
                    await self.write(batch)
                except Exception:  # counted; a sink failure must never kill the agent
                    self.stats.err(len(batch))
                else:
                    self.stats.ok(len(batch))
        await self.close()

    @abc.abstractmethod
    async def write(self, batch: Batch) -> None:
        """Deliver one batch; raise to have it counted as failed."""

    async def close(self) -> None:
        """Release resources after the last batch."""
