"""Controller sink: occurrences as tapio-wire/v1 event batches (``POST <endpoint>/v1/events``).

Behaviour (reference.md §5 "Controller sink", with its gaps fixed, docs/wire.md "Agent
controller mode"):

* ``run()`` only receives: every occurrence is converted to a ``WireEvent`` and encoded once on
  arrival and appended to a bounded queue (``queue_max_events``, default 4096). An occurrence
  that does not fit is dropped and counted (``tapio_sink_drops_total{sink="controller",
  reason="queue_full"}``); the drain path is never blocked by the network.
* A sender task cuts batches of at most ``max_batch_events`` (from the hello response, default
  256) *and* at most 262144 serialized bytes (the controller's body limit, envelope included),
  as soon as a batch is full or the oldest queued event has waited ``send_interval_ms``.
* Every batch gets the next per-process ``sequence`` (1, 2, 3, ...); retries of that batch reuse
  it. Up to ``max_attempts`` attempts with jittered exponential backoff; transport errors,
  timeouts, 429 and 5xx are retried. After the last failure the batch is dropped and counted
  (``reason="send_failed"`` by event count, ``tapio_controller_send_failures_total{kind=
  "events"}`` += 1); a final 4xx answer drops it at once (``reason="rejected"``, same failure
  counter). The next batch takes the next sequence, so the controller sees the gap.
* Sending waits for the agent's first accepted hello (``ControllerLink.registered``), so a
  restarted agent never sends its sequence 1 against the previous process's registration.
* Shutdown: everything queued is flushed at once, within ``shutdown_timeout``; what is still
  held afterwards is counted (``reason="shutdown"``).

WireEvent mapping: ``type``, ``observer`` (2nd segment of ``kernel.<observer>.<anomaly>``),
``severity``, ``timestamp_unix_nanos`` (parsed back from the occurrence timestamp; unparsable =>
0) and ``facts`` = ``data``. Tapio additionally carries the occurrence's ``id``, ``outcome`` and
``error`` inside ``facts`` as ``occurrence_id``, ``outcome``, ``error_code`` and
``error_message`` (never overwriting a fact of the same name; none of them is a reasoning key).
"""

from __future__ import annotations

import random
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final

import aiohttp
import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from yarl import URL

from tapio import wire
from tapio.metrics import CONTROLLER_SEND_FAILURES, SINK_QUEUE_DEPTH, SINK_RETRIES
from tapio.occurrence import Occurrence
from tapio.sinks._retry import (
    backoff_delay,
    classify_exception,
    classify_status,
    make_ssl_context,
    parse_endpoint,
    read_bounded,
)
from tapio.sinks.base import Batch, Sink

log = structlog.get_logger("tapio.sinks.controller")

DEFAULT_QUEUE_MAX_EVENTS: Final = 4096
DEFAULT_MAX_BATCH_EVENTS: Final = 256
DEFAULT_SEND_INTERVAL_MS: Final = 1000
MAX_BATCH_BYTES: Final = wire.MAX_BODY_BYTES
#: Largest controller answer read (EventBatchResponse is ~100 bytes).
MAX_EVENTS_RESPONSE_BYTES: Final = 16 * 1024


@dataclass
class ControllerLink:
    """What the controller sink and the controller client share (one per endpoint).

    The client writes the hello-derived batching and the registration state; the sink reads
    them on every batch, so a re-hello that changes ``max_batch_events`` applies to the next
    batch.
    """

    endpoint: URL
    agent_id: str
    node_name: str
    ssl_context: ssl.SSLContext | None = None
    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    send_interval_ms: int = DEFAULT_SEND_INTERVAL_MS
    #: True once a hello was accepted by the controller (never reset: a re-hello is only needed
    #: after a controller restart, which accepts unregistered senders' events anyway).
    registered: bool = False
    #: Set by the sink: why its last batch was given up (None: healthy). Heartbeats report it.
    sink_error: str | None = None

    def url(self, path: str) -> URL:
        base = self.endpoint.path.rstrip("/")
        return self.endpoint.with_path(base + path).with_query(None).with_fragment(None)

    def apply_batching(self, send_interval_ms: int, max_batch_events: int) -> None:
        # Floors at 1 like the reference; ceilings keep a hostile answer from creating batches
        # the body limit cannot hold or an interval that parks events for hours.
        self.max_batch_events = max(1, min(int(max_batch_events), 100_000))
        self.send_interval_ms = max(1, min(int(send_interval_ms), 60_000))


def make_link(
    endpoint: str, agent_id: str, node_name: str, ca_file: str | None = None
) -> ControllerLink:
    """Validate ``endpoint`` (``http://`` or ``https://``, ``ValueError`` otherwise)."""
    url = parse_endpoint(endpoint, what="controller")
    ctx = make_ssl_context(ca_file) if url.scheme == "https" else None
    return ControllerLink(endpoint=url, agent_id=agent_id, node_name=node_name, ssl_context=ctx)


# ---------------------------------------------------------------------------------------------
# Occurrence -> WireEvent

_TS = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$")


def timestamp_unix_nanos(text: str) -> int:
    """RFC 3339 (``Z`` or an offset, up to nine fraction digits) -> Unix nanoseconds; 0 if not."""
    m = _TS.match(text)
    if m is None:
        return 0
    head, frac, zone = m.groups()
    try:
        dt = datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return 0
    nanos = int(dt.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0"))
    return nanos if 0 <= nanos <= wire.U64_MAX else 0


_EXTRA_FACTS: Final = ("occurrence_id", "outcome", "error_code", "error_message")


def to_wire_event(occ: Occurrence) -> wire.WireEvent:
    """The reference's mapping plus id/outcome/error as facts; ValueError for a non-kernel type."""
    parts = occ.type.split(".")
    if len(parts) != 3 or parts[0] != "kernel" or not parts[1] or not parts[2]:
        raise ValueError(f"occurrence type {occ.type!r} is not kernel.<observer>.<anomaly>")
    facts: dict[str, Any] = dict(occ.data) if occ.data else {}
    facts.setdefault("occurrence_id", occ.id)
    facts.setdefault("outcome", occ.outcome)
    if occ.error is not None:
        facts.setdefault("error_code", occ.error.code)
        facts.setdefault("error_message", occ.error.message)
    return wire.WireEvent(
        type=occ.type,
        timestamp_unix_nanos=timestamp_unix_nanos(occ.timestamp),
        observer=parts[1],
        severity=wire.EventSeverity(occ.severity),
        facts=dict(sorted(facts.items())),
    )


def batch_envelope(link: ControllerLink) -> tuple[bytes, bytes]:
    """Prefix and suffix of an EventBatchRequest body around the comma-joined events.

    ``events`` is the last declared field, so the encoding ends with ``"events":[]}``. The
    prefix is computed with the largest possible ``sequence``/``sent_at`` so its length is an
    upper bound (the byte limit can never be exceeded by a longer number).
    """
    raw = wire.encode(
        wire.EventBatchRequest(
            wire_version=wire.WIRE_VERSION,
            agent_id=link.agent_id,
            node_name=link.node_name,
            sequence=wire.U64_MAX,
            sent_at_unix_nanos=wire.U64_MAX,
            events=[],
        )
    )
    assert raw.endswith(b"[]}")
    return raw[:-2], raw[-2:]


def build_body(link: ControllerLink, sequence: int, sent_at: int, events: list[bytes]) -> bytes:
    head = wire.encode(
        wire.EventBatchRequest(
            wire_version=wire.WIRE_VERSION,
            agent_id=link.agent_id,
            node_name=link.node_name,
            sequence=sequence,
            sent_at_unix_nanos=sent_at,
            events=[],
        )
    )
    return head[:-2] + b",".join(events) + head[-2:]


# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Queued:
    raw: bytes
    arrived: float


class ControllerSink(Sink):
    name: ClassVar[str] = "controller"

    def __init__(
        self,
        link: ControllerLink,
        *,
        queue_max_events: int = DEFAULT_QUEUE_MAX_EVENTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_attempts: int = 4,
        retry_base: float = 0.1,
        retry_cap: float = 2.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        shutdown_timeout: float = 3.0,
    ) -> None:
        super().__init__()
        if queue_max_events < 1 or max_attempts < 1 or max_batch_bytes < 1024:
            raise ValueError("controller sink: queue, attempts and batch bytes must be positive")
        self.link = link
        self.queue_max_events = queue_max_events
        self.max_batch_bytes = max_batch_bytes
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        self._queue: deque[_Queued] = deque()
        self._inflight = 0
        self._closing = False
        self._wake: anyio.Event | None = None
        self._next_sequence = 1
        prefix, suffix = batch_envelope(link)
        self._envelope_bytes = len(prefix) + len(suffix)
        self._depth = SINK_QUEUE_DEPTH.labels(sink=self.name)
        self._retries = SINK_RETRIES.labels(sink=self.name)
        self._failures = CONTROLLER_SEND_FAILURES.labels(kind="events")
        self._depth.set(0)
        self._last_drop_log = -1e9
        #: Sequences of the batches delivered (bounded; for tests and debugging).
        self.delivered_sequences: deque[int] = deque(maxlen=1024)

    @property
    def held(self) -> int:
        return len(self._queue) + self._inflight

    @property
    def healthy(self) -> bool:
        return self.link.sink_error is None

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    # -- receiving side: never awaits the network -------------------------------------------

    def accept(self, batch: Batch) -> None:
        """Convert, encode and queue ``batch`` (drops counted); public for tests."""
        now = time.monotonic()
        queue = self._queue
        was_empty = not queue
        full = 0
        for occ in batch:
            if len(queue) + self._inflight >= self.queue_max_events:
                full += 1
                continue
            try:
                raw = wire.encode(to_wire_event(occ))
            except (ValueError, TypeError, msgspec.EncodeError) as exc:
                self.stats.drop("encode_error")
                self.stats.err()
                log.warning("occurrence not sendable to the controller", error=str(exc))
                continue
            if self._envelope_bytes + len(raw) > self.max_batch_bytes:
                self.stats.drop("too_large")
                self.stats.err()
                log.warning("occurrence larger than a controller batch", bytes=len(raw))
                continue
            queue.append(_Queued(raw, now))
        if full:
            self.stats.drop("queue_full", full)
            self.stats.err(full)
            if now - self._last_drop_log >= 10.0:
                self._last_drop_log = now
                log.warning("controller sink queue full, dropping occurrences", dropped=full)
        self._depth.set(self.held)
        if queue and (was_empty or len(queue) >= self.link.max_batch_events):
            self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- sending side --------------------------------------------------------------------------

    def take_batch(self) -> list[bytes]:
        """The next batch: <= max_batch_events and <= max_batch_bytes serialized (public for
        tests). At least one event when the queue is not empty (each fits, see ``accept``)."""
        limit_n = max(1, self.link.max_batch_events)
        total = self._envelope_bytes
        items: list[bytes] = []
        queue = self._queue
        while queue and len(items) < limit_n:
            size = len(queue[0].raw) + (1 if items else 0)
            if items and total + size > self.max_batch_bytes:
                break
            items.append(queue.popleft().raw)
            total += size
        self._inflight = len(items)
        return items

    def _due_in(self) -> float | None:
        """None when a batch should go now, else seconds until the oldest event's deadline."""
        if self._closing or len(self._queue) >= self.link.max_batch_events:
            return None
        remaining = self._queue[0].arrived + self.link.send_interval_ms / 1000 - time.monotonic()
        return remaining if remaining > 0 else None

    async def _wait(self, delay: float | None) -> None:
        self._wake = anyio.Event()
        with anyio.move_on_after(delay):
            await self._wake.wait()

    async def _sender(self, session: aiohttp.ClientSession, done: anyio.Event) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    await self._wait(None)
                    continue
                if not self._closing and not self.link.registered:
                    await self._wait(0.25)  # no wake-up exists for this; cheap poll
                    continue
                due = self._due_in()
                if due is not None:
                    await self._wait(due)
                    continue
                items = self.take_batch()
                sequence = self._next_sequence
                self._next_sequence += 1
                await self.deliver(session, sequence, items)
                self._inflight = 0
                self._depth.set(self.held)
        finally:
            done.set()

    async def deliver(
        self, session: aiohttp.ClientSession, sequence: int, items: list[bytes]
    ) -> bool:
        """Send one batch with bounded retries (same ``sequence``); True when delivered."""
        n = len(items)
        url = self.link.url("/v1/events")
        headers = {"Content-Type": "application/json"}
        detail = ""
        for attempt in range(self.max_attempts):
            if attempt:
                self._retries.inc()
                await anyio.sleep(
                    backoff_delay(attempt - 1, self.retry_base, self.retry_cap, random.random)
                )
            body = build_body(self.link, sequence, time.time_ns(), items)
            try:
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    raw = await read_bounded(resp, MAX_EVENTS_RESPONSE_BYTES)
                    outcome = classify_status(resp.status, None)
                    status = resp.status
            except Exception as exc:  # transport errors and timeouts
                outcome = classify_exception(exc)
                status = 0
                raw = b""
            if outcome.outcome == "ok":
                try:
                    answer = wire.decode(raw, wire.EventBatchResponse)
                    if answer.rejected:
                        log.warning(
                            "controller rejected events of a batch",
                            rejected=answer.rejected,
                            sequence=sequence,
                        )
                except wire.WireError as exc:
                    log.warning("unexpected controller answer to a batch", error=exc.message)
                self.stats.ok(n)
                self.link.sink_error = None
                self.delivered_sequences.append(sequence)
                return True
            detail = outcome.detail
            if outcome.outcome in ("rejected", "tls_error") and status != 408:
                self._give_up(
                    "rejected" if outcome.outcome == "rejected" else "tls_error",
                    n,
                    sequence,
                    detail,
                    raw,
                )
                return False
            log.debug(
                "event batch attempt failed", sequence=sequence, attempt=attempt + 1, detail=detail
            )
        self._give_up("send_failed", n, sequence, detail, b"")
        return False

    def _give_up(self, reason: str, n: int, sequence: int, detail: str, raw: bytes) -> None:
        self._failures.inc()
        self.stats.drop(reason, n)
        self.stats.err(n)
        self.link.sink_error = f"{reason}: {detail}"
        message = ""
        if raw:
            try:
                message = wire.decode(raw, wire.ErrorEnvelope).error.message
            except wire.WireError:
                message = ""
        log.error(
            "event batch dropped",
            reason=reason,
            detail=detail,
            sequence=sequence,
            events=n,
            controller_error=message or None,
        )

    # -- the contract --------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=self.request_timeout,
            connect=self.connect_timeout,
            sock_connect=self.connect_timeout,
            sock_read=self.request_timeout,
        )
        ctx = self.link.ssl_context
        connector = aiohttp.TCPConnector(
            ssl=ctx if ctx is not None else True, limit=2, ttl_dns_cache=60
        )
        return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        session = self._session()
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
                    self._notify()
                with anyio.move_on_after(self.shutdown_timeout):
                    await done.wait()
                tg.cancel_scope.cancel()
        finally:
            leftover = self.held
            if leftover:
                self.stats.drop("shutdown", leftover)
                self.stats.err(leftover)
                log.warning("controller sink stopped with undelivered events", dropped=leftover)
                self._queue.clear()
                self._inflight = 0
            self._depth.set(0)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await session.close()
