"""Delivery engine: one bounded lane per output, retries with backoff, drain on shutdown.

Contract with ``POST /v1/events``: :meth:`Forwarder.offer` either puts the whole batch into
*every* output's lane or puts it nowhere and returns False; the route answers 200 only in the
first case and 503 with ``Retry-After`` in the second, so the agent keeps the batch and retries
(backpressure end to end, nothing accepted that the controller cannot hold).

Each lane delivers at least once: a chunk stays in flight until its output confirms it
(JetStream ack, bytes on disk); a failed chunk is retried, with jittered exponential backoff,
for as long as the controller runs. Retries cannot duplicate downstream because every record
carries its occurrence id as the key the output de-duplicates on.

Shutdown (SIGTERM): the lanes keep delivering until empty or until the grace period ends; what
is still held then is counted as dropped (``reason="shutdown"``) and logged, never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, Protocol

from tapio.controller.forward.record import Record
from tapio.controller.metrics import ControllerMetrics

DEFAULT_QUEUE_MAX_EVENTS: Final = 10_000
DEFAULT_DRAIN_GRACE: Final = 10.0
CHUNK: Final = 256
BACKOFF_BASE: Final = 0.2
BACKOFF_CAP: Final = 5.0
RETRY_AFTER_SECONDS: Final = 1


class Output(Protocol):
    """A downstream. ``deliver`` returns, per record, True when the output now holds it, False
    to retry it, None when the output will never take it (dropped, ``reason="rejected"``)."""

    name: str

    async def connect(self) -> None: ...

    async def deliver(self, records: Sequence[Record]) -> Sequence[bool | None]: ...

    async def close(self) -> None: ...


class Lane:
    """The queue and the delivery loop of one output."""

    def __init__(self, output: Output, max_items: int, metrics: ControllerMetrics, log: Any):
        self.output = output
        self.max_items = max_items
        self.queue: deque[Record] = deque()
        self.inflight: list[Record] = []
        self.reachable = False
        self._metrics = metrics
        self._log = log
        self._wake = asyncio.Event()
        self._last_error = ""
        metrics.output_up.labels(output.name).set(0)
        metrics.forward_queued.labels(output.name).set(0)

    def __len__(self) -> int:
        return len(self.queue) + len(self.inflight)

    def room(self) -> int:
        return self.max_items - len(self)

    def push(self, records: Sequence[Record]) -> None:
        self.queue.extend(records)
        self._metrics.forward_queued.labels(self.output.name).set(len(self))
        self._wake.set()

    def _failed(self, what: str, exc: BaseException | None) -> None:
        self.reachable = False
        self._metrics.output_up.labels(self.output.name).set(0)
        reason = f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what
        if reason != self._last_error:
            self._log.warning(
                "output unavailable; retrying", output=self.output.name, reason=reason
            )
        self._last_error = reason

    def _ok(self) -> None:
        if not self.reachable:
            if self._last_error:
                self._log.info("output reachable again", output=self.output.name)
            self._last_error = ""
        self.reachable = True
        self._metrics.output_up.labels(self.output.name).set(1)

    async def run(self) -> None:
        name = self.output.name
        attempt = 0
        connected = False
        while True:
            if not connected:
                try:
                    await self.output.connect()
                    connected = True
                    attempt = 0
                    self._ok()
                except Exception as exc:
                    self._failed("connect", exc)
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
            if not self.inflight:
                while not self.queue:
                    self._wake.clear()
                    await self._wake.wait()
                while self.queue and len(self.inflight) < CHUNK:
                    self.inflight.append(self.queue.popleft())
            results: Sequence[bool | None]
            started = time.monotonic()
            try:
                results = await self.output.deliver(self.inflight)
                error: BaseException | None = None
            except Exception as exc:
                results, error = [False] * len(self.inflight), exc
            self._metrics.forward_duration.labels(name).observe(time.monotonic() - started)
            delivered = sum(1 for ok in results if ok)
            refused = sum(1 for ok in results if ok is None)
            failed = [r for r, ok in zip(self.inflight, results, strict=True) if ok is False]
            self.inflight = failed
            self._metrics.forward_forwarded.labels(name).inc(delivered)
            if refused:
                self._metrics.forward_dropped.labels(name, "rejected").inc(refused)
                self._log.error("output refused occurrences for good", output=name, count=refused)
            self._metrics.forward_queued.labels(name).set(len(self))
            if failed:
                self._metrics.forward_retried.labels(name).inc(len(failed))
                self._failed("deliver", error)
                attempt += 1
                await asyncio.sleep(_backoff(attempt))
            else:
                attempt = 0
                self._ok()

    def drop_all(self, reason: str) -> int:
        lost = len(self)
        if lost:
            self._metrics.forward_dropped.labels(self.output.name, reason).inc(lost)
        self.queue.clear()
        self.inflight = []
        self._metrics.forward_queued.labels(self.output.name).set(0)
        return lost


def _backoff(attempt: int) -> float:
    ceiling: float = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt - 1, 16))
    return ceiling / 2 + random.random() * ceiling / 2


class Forwarder:
    """All lanes; owned by the controller app (started and drained by its cleanup context)."""

    def __init__(
        self,
        outputs: Sequence[Output],
        metrics: ControllerMetrics,
        log: Any,
        *,
        queue_max_events: int = DEFAULT_QUEUE_MAX_EVENTS,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
    ) -> None:
        if queue_max_events < 1:
            raise ValueError("queue_max_events must be >= 1")
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ValueError("the same output is configured twice")
        self.metrics = metrics
        self.log = log
        self.drain_grace = drain_grace
        self.lanes = [Lane(o, queue_max_events, metrics, log) for o in outputs]
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return all(lane.reachable for lane in self.lanes)

    def reachability(self) -> dict[str, bool]:
        return {lane.output.name: lane.reachable for lane in self.lanes}

    def pending(self) -> int:
        return sum(len(lane) for lane in self.lanes)

    def offer(self, records: Sequence[Record]) -> bool:
        """All lanes take ``records`` or none does (False: answer 503, nothing changed).

        Taken records are sealed (their documents encoded once, here), so every output sends
        the same ``body`` and the evidence window charges what the record then holds."""
        if any(lane.room() < len(records) for lane in self.lanes):
            return False
        for rec in records:
            rec.seal()
        for lane in self.lanes:
            lane.push(records)
        return True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(lane.run()) for lane in self.lanes]

    async def drain(self, grace: float | None = None) -> int:
        """Keep delivering until every lane is empty or ``grace`` elapsed; then stop, close the
        outputs and count what is left as dropped. Returns the number of records dropped."""
        deadline = time.monotonic() + (self.drain_grace if grace is None else grace)
        while self.pending() and time.monotonic() < deadline:
            if all(t.done() for t in self._tasks):
                break
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        lost = 0
        for lane in self.lanes:
            left = lane.drop_all("shutdown")
            lost += left
            if left:
                self.log.error(
                    "shutdown grace ended with undelivered occurrences",
                    output=lane.output.name,
                    dropped=left,
                )
            with contextlib.suppress(Exception):
                await lane.output.close()
        return lost
