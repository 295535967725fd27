"""The delivery engine of every network sink (HTTP, OTLP, controller).

:class:`DeliverySink` turns the sink contract (``run()`` consuming a stream of batches) into
bounded, retried network delivery; a concrete sink only says how one occurrence is encoded
(:meth:`~DeliverySink.prepare`) and how one attempt is sent (:meth:`~DeliverySink.post`).

* ``run()`` only ever *receives*: every occurrence is prepared (encoded) once and appended to a
  bounded in-memory buffer (``buffer_max_events``, counting the batch in flight). When the buffer
  is full the **oldest** buffered occurrences are dropped and counted (``reason="buffer_full"``):
  fresh evidence wins over stale evidence. The receiving loop never awaits the network, so a dead
  or slow receiver can never stop the sink from accepting (and counting) batches.
* A sender task takes batches out of the buffer, bounded by count, by bytes and by time (the
  oldest buffered occurrence never waits longer than the flush interval), and sends them.
* A failed attempt (transport error, timeout, HTTP 408, 429 or 5xx) is retried with jittered
  exponential backoff, honouring ``Retry-After`` (capped); the *same* batch is re-sent, so the
  sink itself never creates duplicates. After ``max_retries`` retries the batch is dropped
  (``reason="retries_exhausted"``, the controller sink says ``send_failed``). Other 4xx answers
  are final (``reason="rejected"``); a TLS failure is final too (``reason="tls_error"``).
* On shutdown (the stream closes) the sender flushes everything immediately, within
  ``shutdown_timeout``; whatever is still held then is counted (``reason="shutdown"``).

One clock (``anyio.current_time``) measures every wait and deadline.
"""

from __future__ import annotations

import abc
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from tapio.metrics import SINK_QUEUE_DEPTH, SINK_REQUEST_DURATION, SINK_RETRIES
from tapio.occurrence import Occurrence
from tapio.sinks.base import Batch, Sink
from tapio.transport import (
    Attempt,
    RetryPolicy,
    classify_exception,
    client_session,
    describe_exc,
    safe_url,
    tls_for,
)

if TYPE_CHECKING:  # the client session comes from tapio.transport, built when a sink starts
    import aiohttp
    from yarl import URL

log = structlog.get_logger("tapio.sinks")

T = TypeVar("T")


class DeliverySettings(msgspec.Struct, kw_only=True):
    """The delivery knobs shared by the ``[http]`` and ``[otlp]`` sections (defaults here once;
    a sink overrides a default by redeclaring the field). Durations are seconds."""

    #: At most this many occurrences per request.
    batch_size: int = 100
    #: At most this many payload bytes per request (a single larger occurrence is sent alone).
    max_batch_bytes: int = 1024 * 1024
    #: The oldest buffered occurrence is sent at the latest after this long.
    flush_interval_secs: float = 1.0
    #: Occurrences held (buffered + in flight); beyond it the oldest are dropped (``buffer_full``).
    buffer_max_events: int = 10_000
    #: Retries of one batch after the first attempt (408, 429, 5xx, transport errors, timeouts).
    max_retries: int = 5
    #: Exponential backoff: base * 2^n with equal jitter, capped (also caps ``Retry-After``).
    backoff_base_secs: float = 0.5
    backoff_max_secs: float = 30.0
    #: TCP (and TLS) connect timeout.
    connect_timeout_secs: float = 5.0
    #: Whole-request timeout, also the timeout between two reads of the response.
    timeout_secs: float = 10.0
    #: Grace period for the final flush when the agent stops.
    shutdown_timeout_secs: float = 4.0
    #: PEM CA bundle used *instead of* the system store to verify an ``https://`` endpoint.
    ca_file: str | None = None

    def validate_delivery(self, what: str) -> None:
        """Range checks (``ValueError`` naming the field)."""
        if self.batch_size < 1:
            raise ValueError(f"{what}.batch_size must be >= 1")
        if self.max_batch_bytes < 1024:
            raise ValueError(f"{what}.max_batch_bytes must be >= 1024")
        if not 0 < self.flush_interval_secs <= 3600:
            raise ValueError(f"{what}.flush_interval_secs must be in (0, 3600]")
        if self.buffer_max_events < self.batch_size:
            raise ValueError(f"{what}.buffer_max_events must be >= batch_size")
        if not 0 <= self.max_retries <= 100:
            raise ValueError(f"{what}.max_retries must be in [0, 100]")
        if not 0 < self.backoff_base_secs <= self.backoff_max_secs <= 3600:
            raise ValueError(f"{what}: need 0 < backoff_base_secs <= backoff_max_secs <= 3600")
        for name in ("connect_timeout_secs", "timeout_secs", "shutdown_timeout_secs"):
            if not 0 < getattr(self, name) <= 600:
                raise ValueError(f"{what}.{name} must be in (0, 600]")

    def delivery_config(self, url: URL) -> DeliveryConfig:
        """The engine's knobs; an ``https`` URL gets a verifying TLS context (``ca_file``)."""
        return DeliveryConfig(
            url=url,
            batch_size=self.batch_size,
            max_batch_bytes=self.max_batch_bytes,
            flush_interval=self.flush_interval_secs,
            buffer_max_events=self.buffer_max_events,
            retry=RetryPolicy(self.max_retries, self.backoff_base_secs, self.backoff_max_secs),
            connect_timeout=self.connect_timeout_secs,
            timeout=self.timeout_secs,
            shutdown_timeout=self.shutdown_timeout_secs,
            ssl_context=tls_for(url, self.ca_file),
        )


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The knobs of :class:`DeliverySink` (seconds, counts, bytes)."""

    url: URL
    batch_size: int
    max_batch_bytes: int
    flush_interval: float
    buffer_max_events: int
    retry: RetryPolicy
    connect_timeout: float
    timeout: float
    shutdown_timeout: float
    ssl_context: ssl.SSLContext | None


class Undeliverable(Exception):
    """Raised by :meth:`DeliverySink.prepare`: this occurrence can never be sent; it is dropped
    and counted with ``reason`` instead of poisoning its batch."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Item(Generic[T]):
    __slots__ = ("arrived", "payload", "size")

    def __init__(self, payload: T, size: int, arrived: float) -> None:
        self.payload = payload
        self.size = size
        self.arrived = arrived


class DeliverySink(Sink, Generic[T], abc.ABC):
    """Bounded buffer + sender task + retries; subclasses encode and send (see module docs)."""

    #: The drop reason of a batch whose retries are used up.
    exhausted_reason: ClassVar[str] = "retries_exhausted"

    def __init__(self, config: DeliveryConfig) -> None:
        super().__init__()
        self._cfg = config
        self._buf: deque[_Item[T]] = deque()
        self._buf_bytes = 0
        self._inflight = 0
        self._closing = False
        self._wake = anyio.Event()
        self._depth = SINK_QUEUE_DEPTH.labels(sink=self.label)
        self._retries = SINK_RETRIES.labels(sink=self.label)
        self._request_duration = SINK_REQUEST_DURATION.labels(sink=self.label)
        self._depth.set(0)
        self._last_overflow_log = -1e9
        #: Why the last batch was given up, until a later batch is delivered (None: healthy).
        self.last_error: str | None = None

    # -- subclass hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[T, int]:
        """Encode one occurrence once, on arrival; return the payload and its size in bytes.
        Raise :class:`Undeliverable` for an occurrence that can never be sent."""

    @abc.abstractmethod
    async def post(self, session: aiohttp.ClientSession, items: list[T]) -> Attempt:
        """One delivery attempt of ``items``; transport exceptions may propagate."""

    def start_batch(self) -> None:
        """Called once per batch, before its first attempt (retries reuse what it set up)."""

    def batch_limit(self) -> int:
        """Occurrences per request at most (the controller's hello may change it)."""
        return self._cfg.batch_size

    def flush_interval(self) -> float:
        """The longest wait of a buffered occurrence, in seconds."""
        return self._cfg.flush_interval

    def may_send(self) -> bool:
        """False holds batches back (still buffered, bounded) until it turns True or the sink
        shuts down."""
        return True

    async def before_retry(self) -> None:
        """Awaited after the backoff and before the next attempt of the same batch (bounded
        by the subclass); the controller sink waits there for a re-registration."""

    def given_up(self, reason: str, detail: str, n: int) -> None:
        """A batch of ``n`` was dropped (already counted); for sink-specific bookkeeping."""

    def batch_context(self) -> dict[str, Any]:
        """Extra fields for the log events about the batch in flight."""
        return {}

    # -- introspection (tests, health) ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False from a batch given up (rejected, TLS, retries exhausted) until the next
        delivery succeeds; for the agent's readiness (``/readyz``)."""
        return self.last_error is None

    @property
    def held(self) -> int:
        """Occurrences buffered or in flight."""
        return len(self._buf) + self._inflight

    def _safe_url(self) -> str:
        return safe_url(self._cfg.url)

    @property
    def _log(self) -> Any:
        # Bound per use (logging is rare here) so a structlog configuration made after the
        # sink was constructed still applies.
        return log.bind(sink=self.label, endpoint=self._safe_url())

    # -- the contract --------------------------------------------------------------------------

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        cfg = self._cfg
        session = client_session(
            ssl_context=cfg.ssl_context, connect_timeout=cfg.connect_timeout, timeout=cfg.timeout
        )
        done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender, session, done)
                try:
                    async with batches:
                        async for batch in batches:
                            self.accept(batch)
                finally:
                    self._closing = True
                    self._wake.set()
                with anyio.move_on_after(cfg.shutdown_timeout):
                    await done.wait()
                tg.cancel_scope.cancel()
        finally:
            leftover = self.held
            if leftover:
                self.stats.drop("shutdown", leftover)
                self.stats.err(leftover)
                self._log.warning("sink shutdown with undelivered occurrences", dropped=leftover)
                self._buf.clear()
                self._buf_bytes = 0
                self._inflight = 0
            self._depth.set(0)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await session.close()

    # -- receiving side: never awaits ----------------------------------------------------------

    def accept(self, batch: Batch) -> None:
        """Encode and buffer ``batch`` (drops counted); never waits."""
        if not batch:
            return
        observed_ns = time.time_ns()
        now = anyio.current_time()
        buf = self._buf
        was_empty = not buf
        for occ in batch:
            try:
                payload, size = self.prepare(occ, observed_ns)
            except Undeliverable as exc:
                self._drop_one(exc.reason, str(exc))
                continue
            except Exception as exc:  # a malformed occurrence must not poison the batch
                self._drop_one("encode_error", describe_exc(exc))
                continue
            buf.append(_Item(payload, size, now))
            self._buf_bytes += size
        overflow = len(buf) + self._inflight - self._cfg.buffer_max_events
        if overflow > 0:
            overflow = min(overflow, len(buf))
            for _ in range(overflow):
                self._buf_bytes -= buf.popleft().size
            self.stats.drop("buffer_full", overflow)
            self.stats.err(overflow)
            if now - self._last_overflow_log >= 10.0:
                self._last_overflow_log = now
                self._log.warning("sink buffer full, dropping oldest occurrences", dropped=overflow)
        self._depth.set(self.held)
        if buf and (self._full() or was_empty):  # a batch is ready, or a flush deadline starts
            self._wake.set()

    def _drop_one(self, reason: str, detail: str) -> None:
        self.stats.drop(reason)
        self.stats.err()
        self._log.warning("occurrence cannot be sent", reason=reason, error=detail)

    def _full(self) -> bool:
        return len(self._buf) >= self.batch_limit() or self._buf_bytes >= self._cfg.max_batch_bytes

    # -- sending side --------------------------------------------------------------------------

    async def _wait(self, delay: float | None) -> None:
        with anyio.move_on_after(delay):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = anyio.Event()

    def _due_in(self) -> float | None:
        """None when a batch should go now, else the seconds until the oldest item's deadline."""
        if self._closing or self._full():
            return None
        remaining = self._buf[0].arrived + self.flush_interval() - anyio.current_time()
        return remaining if remaining > 0 else None

    def take(self) -> list[T]:
        """The next batch: at most ``batch_limit()`` items and ``max_batch_bytes`` bytes, at
        least one item while any is buffered."""
        items: list[T] = []
        total = 0
        buf = self._buf
        limit_n, limit_b = max(1, self.batch_limit()), self._cfg.max_batch_bytes
        while buf and len(items) < limit_n:
            head = buf[0]
            if items and total + head.size > limit_b:
                break
            buf.popleft()
            items.append(head.payload)
            total += head.size
        self._buf_bytes -= total
        self._inflight = len(items)
        return items

    async def _sender(self, session: aiohttp.ClientSession, done: anyio.Event) -> None:
        try:
            while True:
                if not self._buf:
                    if self._closing:
                        return
                    await self._wait(None)
                    continue
                if not self._closing and not self.may_send():
                    await self._wait(0.25)  # no wake-up exists for this; cheap poll
                    continue
                remaining = self._due_in()
                if remaining is not None:
                    await self._wait(remaining)
                    continue
                items = self.take()
                self.start_batch()
                await self._deliver(session, items)
                # Completed normally (delivered or counted): nothing is in flight any more.
                self._inflight = 0
                self._depth.set(self.held)
        finally:
            done.set()

    async def _deliver(self, session: aiohttp.ClientSession, items: list[T]) -> None:
        n = len(items)
        policy = self._cfg.retry
        retry = 0
        while True:
            started = time.monotonic()
            try:
                attempt = await self.post(session, items)
            except Exception as exc:  # transport errors, timeouts, token file trouble
                attempt = classify_exception(exc)
            self._request_duration.observe(time.monotonic() - started)
            if attempt.outcome == "ok":
                delivered = n - min(n, attempt.rejected_items)
                self.stats.ok(delivered)
                self.last_error = None
                if attempt.rejected_items:
                    self.stats.drop("rejected", n - delivered)
                    self.stats.err(n - delivered)
                    self._log.warning(
                        "receiver rejected part of a batch", rejected=n - delivered, batch=n
                    )
                return
            if attempt.outcome in ("rejected", "tls_error"):
                self._give_up(attempt.outcome, attempt.detail, n, attempts=retry + 1)
                return
            if retry >= policy.max_retries:
                self._give_up(self.exhausted_reason, attempt.detail, n, attempts=retry + 1)
                return
            delay = policy.delay(retry, attempt.retry_after)
            self._retries.inc()
            self._log.warning(
                "delivery failed, retrying",
                detail=attempt.detail,
                retry_in_secs=round(delay, 3),
                attempt=retry + 1,
                batch=n,
                **self.batch_context(),
            )
            await anyio.sleep(delay)
            await self.before_retry()
            retry += 1

    def _give_up(self, reason: str, detail: str, n: int, *, attempts: int) -> None:
        self.last_error = f"{reason}: {detail}"
        self.stats.drop(reason, n)
        self.stats.err(n)
        self.given_up(reason, detail, n)
        self._log.error(
            "batch dropped",
            reason=reason,
            detail=detail,
            attempts=attempts,
            batch=n,
            **self.batch_context(),
        )
