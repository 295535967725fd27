"""Controller sink: occurrences as tapio-wire/v1 event batches (``POST <endpoint>/v1/events``).

The sink is the shared delivery engine (:mod:`tapio.sinks.delivery`: bounded buffer dropping
the oldest on overflow, batching by count, bytes and time, retries with backoff, bounded final
flush; docs/sinks.md) plus what the controller protocol adds (docs/wire.md "Agent controller
mode"):

* every occurrence is converted to a ``WireEvent`` and encoded once on arrival; one that is
  not a kernel event is dropped (``reason="encode_error"``), one larger than a whole batch may
  be (``reason="too_large"``);
* batches hold at most ``max_batch_events`` (from the hello answer, default 256) and at most
  262144 serialized bytes (the controller's body limit, envelope included), and go out as soon
  as one is full or the oldest held event has waited ``send_interval_ms`` (also from hello);
* every batch gets the next per-process ``sequence`` (1, 2, 3, ...); retries of that batch reuse
  it. A batch whose retries are used up is dropped (``reason="send_failed"``), a final 4xx drops
  it at once (``reason="rejected"``); both add one to
  ``tapio_controller_send_failures_total{kind="events"}``. The next batch takes the next
  sequence, so the controller sees the gap;
* sending waits for the agent's first accepted hello (``ControllerLink.registered``), so a
  restarted agent never sends its sequence 1 against the previous process's registration;
* a ``409 UNKNOWN_AGENT`` answer (the controller restarted with fresh state, or the request
  reached a replica that never saw our hello) is not a final rejection: the batch is kept, the
  link asks the controller client for a new hello (``request_rehello``, rate-limited), the
  retry waits (bounded) for it to be accepted and re-sends the *same* batch with the *same*
  sequence, which the fresh registration takes as its baseline (no gap, no duplicate). It uses
  the normal retry budget, so a controller that keeps answering 409 costs at most
  ``max_retries + 1`` attempts per batch, then the batch is counted as ``send_failed``.

WireEvent mapping: ``type``, ``observer`` (2nd segment of ``kernel.<observer>.<anomaly>``),
``severity``, ``timestamp_unix_nanos`` (parsed back from the occurrence timestamp; unparsable =>
0) and ``facts`` = ``data``. Tapio additionally carries the occurrence's ``id``, ``outcome`` and
``error`` inside ``facts`` as ``occurrence_id``, ``outcome``, ``error_code`` and
``error_message`` (never overwriting a fact of the same name; none of them is a reasoning key).
"""

from __future__ import annotations

import re
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final

import structlog

from tapio import wire
from tapio.metrics import CONTROLLER_SEND_FAILURES
from tapio.occurrence import Occurrence
from tapio.sinks.delivery import DeliveryConfig, DeliverySink, Undeliverable
from tapio.transport import (
    Attempt,
    ControllerLink,
    RetryPolicy,
    classify_status,
    read_bounded,
)

if TYPE_CHECKING:  # aiohttp loads with the first session, not with controller mode
    import aiohttp

log = structlog.get_logger("tapio.sinks.controller")

DEFAULT_BUFFER_MAX_EVENTS: Final = 4096
MAX_BATCH_BYTES: Final = wire.MAX_BODY_BYTES
#: Largest controller answer read (EventBatchResponse is ~100 bytes).
MAX_EVENTS_RESPONSE_BYTES: Final = 16 * 1024
_HEADERS: Final = {"Content-Type": "application/json"}
#: The wire error code of a batch from an agent the controller does not know.
UNKNOWN_AGENT: Final = "UNKNOWN_AGENT"


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
    """The occurrence as a WireEvent (type, observer, severity, timestamp, facts = data plus
    id/outcome/error); ValueError for a type that is not ``kernel.<observer>.<anomaly>``."""
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


class ControllerSink(DeliverySink[bytes]):
    """Event batches to the controller of ``link`` (see the module docs)."""

    name: ClassVar[str] = "controller"
    exhausted_reason: ClassVar[str] = "send_failed"

    def __init__(
        self,
        link: ControllerLink,
        *,
        buffer_max_events: int = DEFAULT_BUFFER_MAX_EVENTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_retries: int = 3,
        backoff_base: float = 0.1,
        backoff_max: float = 2.0,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        shutdown_timeout: float = 3.0,
    ) -> None:
        if buffer_max_events < 1 or max_retries < 0 or max_batch_bytes < 1024:
            raise ValueError("controller sink: buffer, retries and batch bytes must be positive")
        self.link = link
        prefix, suffix = batch_envelope(link)
        self._envelope_bytes = len(prefix) + len(suffix)
        self.max_batch_bytes = max_batch_bytes
        self._sequence = 0
        self._failures = CONTROLLER_SEND_FAILURES.labels(kind="events")
        #: Sequences of the batches delivered (bounded; for tests and debugging).
        self.delivered_sequences: deque[int] = deque(maxlen=1024)
        super().__init__(
            DeliveryConfig(
                url=link.url("/v1/events"),
                batch_size=link.max_batch_events,
                # Every event costs its bytes plus a separating comma; the envelope is fixed.
                max_batch_bytes=max_batch_bytes - self._envelope_bytes,
                flush_interval=link.send_interval_ms / 1000,
                buffer_max_events=buffer_max_events,
                retry=RetryPolicy(max_retries, backoff_base, backoff_max),
                connect_timeout=connect_timeout,
                timeout=timeout,
                shutdown_timeout=shutdown_timeout,
                ssl_context=link.ssl_context,
            )
        )

    # -- health lives on the link, where the heartbeat reads it ---------------------------------

    @property
    def last_error(self) -> str | None:
        return self.link.sink_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self.link.sink_error = value

    @property
    def next_sequence(self) -> int:
        return self._sequence + 1

    # -- what the link decides ------------------------------------------------------------------

    def batch_limit(self) -> int:
        return self.link.max_batch_events

    def flush_interval(self) -> float:
        return self.link.send_interval_ms / 1000

    def may_send(self) -> bool:
        return self.link.registered

    # -- encoding and sending -------------------------------------------------------------------

    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[bytes, int]:
        raw = wire.encode(to_wire_event(occ))
        if self._envelope_bytes + len(raw) > self.max_batch_bytes:
            raise Undeliverable("too_large", f"occurrence of {len(raw)} bytes exceeds a batch")
        return raw, len(raw) + 1

    def start_batch(self) -> None:
        self._sequence += 1

    def batch_context(self) -> dict[str, Any]:
        return {"sequence": self._sequence}

    async def post(self, session: aiohttp.ClientSession, items: list[bytes]) -> Attempt:
        body = build_body(self.link, self._sequence, time.time_ns(), items)
        async with session.post(
            self._cfg.url,
            data=body,
            headers={**_HEADERS, **self.link.auth_headers()},
            allow_redirects=False,
        ) as resp:
            raw = await read_bounded(resp, MAX_EVENTS_RESPONSE_BYTES)
            attempt = classify_status(resp.status, resp.headers.get("Retry-After"))
        if attempt.outcome == "ok":
            self._read_answer(raw)
            self.delivered_sequences.append(self._sequence)
        elif attempt.outcome == "rejected" and raw:
            try:
                error = wire.decode(raw, wire.ErrorEnvelope).error
            except wire.WireError:
                return attempt
            detail = f"{attempt.detail} {error.code}: {error.message}"
            if resp.status == 409 and error.code == UNKNOWN_AGENT:
                if self.link.request_rehello("unknown_agent"):
                    log.warning(
                        "controller does not know this agent; re-registering, batch kept",
                        sequence=self._sequence,
                    )
                return Attempt("retry", detail)
            return Attempt("rejected", detail)
        return attempt

    async def before_retry(self) -> None:
        # After a 409 UNKNOWN_AGENT the retry waits for the new hello (bounded: a controller
        # client that cannot register makes the retry go out anyway and use up the budget).
        if not self.link.registered:
            await self.link.wait_registered(self._cfg.timeout)

    def _read_answer(self, raw: bytes) -> None:
        try:
            answer = wire.decode(raw, wire.EventBatchResponse)
        except wire.WireError as exc:
            log.warning("unexpected controller answer to a batch", error=exc.message)
            return
        if answer.rejected:
            log.warning(
                "controller rejected events of a batch",
                rejected=answer.rejected,
                sequence=self._sequence,
            )

    def given_up(self, reason: str, detail: str, n: int) -> None:
        self._failures.inc()
