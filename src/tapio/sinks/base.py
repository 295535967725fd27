"""The sink contract.

A sink owns its consumption loop: the agent hands it the receiving end of a bounded memory
stream of *batches* and runs ``run()`` in its own task. When the stream closes (shutdown) the sink
drains what is left, flushes, and returns. The agent fans out with ``send_nowait`` and counts a
``queue_full`` drop when a sink's stream (its fan-out lane) is full, so no sink can ever stall
ring-buffer draining.

Every occurrence handed to a sink ends in exactly one counter, per occurrence: written
(``tapio_sink_writes_total{result="ok"}``) or dropped with a reason
(``tapio_sink_drops_total{reason=...}``, plus ``result="err"`` when the sink itself gave it up).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import ClassVar

import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from tapio.metrics import SINK_DROPS, SINK_WRITES
from tapio.occurrence import Occurrence

Batch = Sequence[Occurrence]

log = structlog.get_logger("tapio.sinks")


class SinkError(Exception):
    """A sink delivered only part of a batch: ``written`` of its occurrences made it, the rest
    did not (``BatchWriterSink`` counts the rest as ``write_error`` drops)."""

    def __init__(self, message: str, *, written: int = 0) -> None:
        super().__init__(message)
        self.written = written


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

    def __init__(self, label: str | None = None) -> None:
        #: The ``sink`` label of this sink's metrics (the class's name unless given).
        self.label = label or self.name
        self.stats = SinkStats(self.label)

    @abc.abstractmethod
    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        """Consume batches until the stream is closed, then flush and return."""


class BatchWriterSink(Sink):
    """A sink that writes each batch as it arrives (stdout, file, memory).

    A failed write never kills the agent: what it wrote is counted ok, the rest is counted
    ``err`` and dropped with ``reason="write_error"`` (a partial write says how far it got by
    raising :class:`SinkError` with ``written``). The next batch is tried again, so the sink
    recovers by itself when the cause (a full disk, a closed pipe reader) goes away.
    """

    #: Seconds between two "write failed" log events of one sink (the counters count each).
    LOG_INTERVAL = 10.0

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        last_log = -self.LOG_INTERVAL
        async with batches:
            async for batch in batches:
                try:
                    await self.write(batch)
                except Exception as exc:  # counted; a sink failure must never kill the agent
                    written = min(len(batch), exc.written if isinstance(exc, SinkError) else 0)
                    self.stats.ok(written)
                    self.stats.err(len(batch) - written)
                    self.stats.drop("write_error", len(batch) - written)
                    now = time.monotonic()
                    if now - last_log >= self.LOG_INTERVAL:
                        last_log = now
                        log.warning(
                            "sink write failed",
                            sink=self.label,
                            dropped=len(batch) - written,
                            error=f"{type(exc).__name__}: {exc}",
                        )
                else:
                    self.stats.ok(len(batch))
        await self.close()

    @abc.abstractmethod
    async def write(self, batch: Batch) -> None:
        """Deliver one batch; raise (``SinkError`` with ``written`` for a partial write) to have
        the undelivered part counted."""

    async def close(self) -> None:
        """Release resources after the last batch."""
