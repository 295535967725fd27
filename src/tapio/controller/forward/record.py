"""The document the controller forwards for each accepted event, and its delivery key.

Agents send ``WireEvent``s; Tapio agents carry the occurrence's ``id``, ``outcome`` and
``error`` inside ``facts`` (``occurrence_id``, ``outcome``, ``error_code``, ``error_message``).
The controller turns each event back into an occurrence-shaped JSON document, adds who sent it
(``node_name``, ``agent_id``), and encodes it at most once for every output; all of them ship
the same bytes.

A record is built at ingest from what the route already decoded (its key and the fields the
evidence window filters on) plus the event's JSON as the agent sent it; its document is encoded
only when something sends it: the forwarders (:meth:`Record.seal`, once, when a batch enters
their queues) and the evidence endpoints (:meth:`Record.document`, for what they return). A
controller without outputs so never encodes the documents its window forgets unread. The
records of what agents send (object facts carrying their own ids, none of the facts the window
filters on) are built column by column for the whole batch; any other batch, event by event.

The occurrence id is the de-duplication key downstream (JetStream ``Nats-Msg-Id``, the file
output's recent-id set). An event without one (an agent that does not send it) gets an id
derived from its content, so a retried batch still maps to the same key.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, Final

import msgspec

from tapio import wire
from tapio.controller import batch as batch_module

SUBJECT_PREFIX: Final = "tapio.evidence."
_EXTRA_FACTS: Final = ("occurrence_id", "outcome", "error_code", "error_message")
_SUBJECT_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")
_MAX_ID_CHARS: Final = 128
#: Records are stored and forwarded as sorted-key JSON, so equal occurrences are equal bytes.
_ENCODER: Final = msgspec.json.Encoder(order="deterministic")


class ForwardedError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class ForwardedOccurrence(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    timestamp: str
    timestamp_unix_nanos: int
    source: str
    type: str
    severity: str
    outcome: str
    observer: str
    node_name: str
    agent_id: str
    data: dict[str, Any]
    error: ForwardedError | None = None


class Origin(msgspec.Struct, frozen=True, gc=False):
    """Who sent a batch: one object shared by the records of that batch."""

    agent_id: str
    node_name: str


class Record(msgspec.Struct, gc=False):
    """One forwardable occurrence: key, routing and the document, plus the few fields the
    evidence window filters on (so a query never decodes a document it does not return).

    Either ``body`` holds the encoded document, or ``event`` holds the agent's event JSON as
    received and ``origin`` its sender, from which :meth:`document` builds the same bytes.
    A Struct (built in C, one per ingested event) outside the garbage collector's tracking:
    it holds only strings, bytes and an :class:`Origin`, so it can never be part of a cycle,
    and a full evidence window adds nothing to every collection's work."""

    id: str
    type: str
    node_name: str
    body: bytes = b""
    ts_ns: int = 0
    severity: str = ""
    namespace: str = ""
    pod: str = ""
    workload_kind: str = ""
    workload_name: str = ""
    event: bytes = b""
    origin: Origin | None = None
    #: :func:`held_bytes` of the record, filled in by ingest from the batch's columns and kept
    #: by :meth:`seal` (0: not known, computed when asked).
    held: int = 0

    @property
    def subject(self) -> str:
        return subject_for(self.type)

    def document(self) -> bytes:
        """The encoded document (built again on each call while the record is not sealed)."""
        if self.origin is None:
            return self.body
        event = _EVENT_DECODER.decode(self.event)
        return _ENCODER.encode(_occurrence(self.origin, event, self.id, None))

    def seal(self) -> bytes:
        """Encode the document once and keep it instead of the event (what outputs send)."""
        if self.origin is not None:
            body = self.document()
            if self.held:
                self.held += len(body) - len(self.event)
            self.body = body
            self.event = b""
            self.origin = None
        return self.body


def held_bytes(rec: Record) -> int:
    """The length of what a record holds: its document (or event) and its strings.

    The strings are ids, types and DNS-1123 names: ASCII, whose size is its length plus a
    fixed header, so summing lengths is exact for them (a non-ASCII string would take up to 4
    bytes a character; the document, the bulk of a record, is counted exactly either way)."""
    return (
        len(rec.body)
        + len(rec.event)
        + len(rec.id)
        + len(rec.type)
        + len(rec.node_name)
        + len(rec.severity)
        + len(rec.namespace)
        + len(rec.pod)
        + len(rec.workload_kind)
        + len(rec.workload_name)
    )


def subject_for(event_type: str) -> str:
    """``tapio.evidence.<type>``; characters NATS gives a meaning to (space, ``*``, ``>``) and
    empty tokens are replaced so a strange type can never become a wildcard or a bad subject."""
    tokens = [_SUBJECT_TOKEN_BAD.sub("_", t) or "_" for t in event_type.split(".")]
    return SUBJECT_PREFIX + ".".join(tokens)


_heads: dict[int, str] = {}


def rfc3339_nanos(nanos: int) -> str:
    # A batch's events fall within a few seconds: the date part is formatted once per second
    # (a bounded cache), not once per event.
    seconds, frac = divmod(nanos, 1_000_000_000)
    head = _heads.get(seconds)
    if head is None:
        if len(_heads) >= 256:
            _heads.clear()
        head = _heads[seconds] = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{head}.{frac:09d}+00:00"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _content_id(origin: Origin, event: wire.WireEvent) -> str:
    digest = hashlib.sha256()
    for part in (origin.agent_id, origin.node_name, event.type, str(event.timestamp_unix_nanos)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(_ENCODER.encode(event.facts))
    return "sha256-" + digest.hexdigest()[:32]


#: Adds fields to an occurrence's data (Kubernetes enrichment); never overwrites agent facts.
Enrich = Callable[[dict[str, Any]], dict[str, Any]]


def _facts(event: wire.WireEvent) -> dict[str, Any]:
    return event.facts if isinstance(event.facts, dict) else {"value": event.facts}


def _key(origin: Origin, event: wire.WireEvent, facts: dict[str, Any]) -> str:
    occurrence_id = _text(facts.get("occurrence_id"))
    if occurrence_id is None or len(occurrence_id) > _MAX_ID_CHARS:
        return _content_id(origin, event)
    return occurrence_id


def _occurrence(
    origin: Origin, event: wire.WireEvent, occurrence_id: str, enrich: Enrich | None
) -> ForwardedOccurrence:
    facts = _facts(event)
    data = dict(facts)
    for key in _EXTRA_FACTS:
        data.pop(key, None)
    if enrich is not None:
        for key, value in enrich(data).items():
            data.setdefault(key, value)
    error = None
    code, message = _text(facts.get("error_code")), _text(facts.get("error_message"))
    if code is not None:
        error = ForwardedError(code=code, message=message or "")
    return ForwardedOccurrence(
        id=occurrence_id,
        timestamp=rfc3339_nanos(event.timestamp_unix_nanos),
        timestamp_unix_nanos=event.timestamp_unix_nanos,
        source="tapio",
        type=event.type,
        severity=event.severity.value,
        outcome=_text(facts.get("outcome")) or "unknown",
        observer=event.observer,
        node_name=origin.node_name,
        agent_id=origin.agent_id,
        data=data,
        error=error,
    )


def build_record(
    batch: wire.EventBatchRequest, event: wire.WireEvent, enrich: Enrich | None = None
) -> Record:
    """The record of one event, its document encoded now."""
    origin = Origin(batch.agent_id, batch.node_name)
    return record_of(_occurrence(origin, event, _key(origin, event, _facts(event)), enrich))


def record_of(doc: ForwardedOccurrence) -> Record:
    """The record of an occurrence document (the agents' and the controller's own)."""
    data = doc.data
    return Record(
        id=doc.id,
        type=doc.type,
        node_name=doc.node_name,
        body=_ENCODER.encode(doc),
        ts_ns=doc.timestamp_unix_nanos,
        severity=doc.severity,
        namespace=_text(data.get("pod_namespace")) or "",
        pod=_text(data.get("pod_name")) or "",
        workload_kind=_text(data.get("workload_kind")) or "",
        workload_name=_text(data.get("workload_name")) or "",
    )


def build_records(batch: wire.EventBatchRequest, enrich: Enrich | None = None) -> list[Record]:
    """The records of a batch whose facts were decoded (not a clean batch's few kept facts)."""
    if batch.facts_proven == "clean":
        raise ValueError("a clean batch's facts were not decoded; decode it with full()")
    return [build_record(batch, event, enrich) for event in batch.events]


class _RawEvents(msgspec.Struct):
    events: list[msgspec.Raw]


_RAW_EVENTS: Final = msgspec.json.Decoder(_RawEvents)
_EVENT_DECODER: Final = msgspec.json.Decoder(wire.WireEvent)
#: The facts the evidence window filters on; an event carrying none of them (what agents send:
#: the controller's enrichment adds them) skips looking each one up.
_FILTER_FACTS: Final = frozenset({"pod_namespace", "pod_name", "workload_kind", "workload_name"})
_OCCURRENCE_ID_OF: Final = operator.attrgetter("facts.occurrence_id")
_FILTER_FACTS_OF: Final = operator.attrgetter(*(f"facts.{name}" for name in sorted(_FILTER_FACTS)))
_NO_FILTER_FACTS: Final = frozenset({(msgspec.UNSET,) * len(_FILTER_FACTS)})
_DICTS: Final = frozenset({dict})
_STRS: Final = frozenset({str})
_FACTS_OF: Final = operator.attrgetter("facts")
_TYPE_OF: Final = operator.attrgetter("type")
_TS_OF: Final = operator.attrgetter("timestamp_unix_nanos")
#: An enum member's value as a plain attribute read (``.value`` is a Python-level property).
_SEVERITY_VALUE: Final = operator.attrgetter("severity._value_")


def ingest_records(
    batch: wire.EventBatchRequest, body: bytes, enrich: Enrich | None = None
) -> list[Record]:
    """The records of a decoded, validated batch whose request body was ``body``, documents not
    yet encoded. Each record keeps its event's JSON exactly as received (a copy, so the window
    holds no request body). Enriched records are encoded now (the window would otherwise hold
    each one's enrichment besides the event)."""
    clean = batch.facts_proven == "clean"  # only the facts ingest reads were decoded
    if enrich is not None:
        return build_records(batch_module.full(body) if clean else batch, enrich)
    raws = _RAW_EVENTS.decode(body).events
    events = batch.events
    if len(raws) != len(events):  # cannot happen for a body that decoded as ``batch``
        return build_records(batch_module.full(body) if clean else batch)
    origin = Origin(batch.agent_id, batch.node_name)
    if clean:
        ids = list[Any](map(_OCCURRENCE_ID_OF, events))
        plain = _NO_FILTER_FACTS.issuperset(map(_FILTER_FACTS_OF, events))
    else:
        facts = list(map(_FACTS_OF, events))
        ids = (
            list[Any](map(dict.get, facts, repeat("occurrence_id")))
            if _DICTS.issuperset(map(type, facts))
            else []
        )
        plain = bool(ids) and _FILTER_FACTS.isdisjoint(set[str]().union(*facts))
    if not (
        plain
        and _STRS.issuperset(map(type, ids))
        and min(map(len, ids)) > 0
        and max(map(len, ids)) <= _MAX_ID_CHARS
    ):
        if clean:
            events = batch_module.full(body).events
        return _ingest_each(origin, events, raws)
    # What agents send (object facts, their own ids, no filter facts): the records built in
    # one C-level pass over the batch's columns.
    types = list(map(_TYPE_OF, events))
    severities = list(map(_SEVERITY_VALUE, events))
    kept = list(map(bytes, raws))
    lengths = zip(map(len, kept), map(len, ids), map(len, types), map(len, severities), strict=True)
    held = map(len(batch.node_name).__add__, map(sum, lengths))
    blank = repeat("")
    return list(
        map(
            Record,
            ids,
            types,
            repeat(batch.node_name),
            repeat(b""),
            map(_TS_OF, events),
            severities,
            blank,
            blank,
            blank,
            blank,
            kept,
            repeat(origin),
            held,
        )
    )


def _ingest_each(
    origin: Origin, events: list[wire.WireEvent], raws: list[msgspec.Raw]
) -> list[Record]:
    records = []
    for event, raw in zip(events, raws, strict=True):
        facts = _facts(event)
        occurrence_id = _key(origin, event, facts)
        records.append(
            Record(
                occurrence_id,
                event.type,
                origin.node_name,
                b"",
                event.timestamp_unix_nanos,
                event.severity.value,
                _text(facts.get("pod_namespace")) or "",
                _text(facts.get("pod_name")) or "",
                _text(facts.get("workload_kind")) or "",
                _text(facts.get("workload_name")) or "",
                bytes(raw),
                origin,
            )
        )
    return records
