"""The document the controller forwards for each accepted event, and its delivery key.

Agents send ``WireEvent``s; Tapio agents carry the occurrence's ``id``, ``outcome`` and
``error`` inside ``facts`` (``occurrence_id``, ``outcome``, ``error_code``, ``error_message``).
The controller turns each event back into an occurrence-shaped JSON document, adds who sent it
(``node_name``, ``agent_id``), and encodes it once; every output ships the same bytes.

The occurrence id is the de-duplication key downstream (JetStream ``Nats-Msg-Id``, the file
output's recent-id set). An event without one (an agent that does not send it) gets an id
derived from its content, so a retried batch still maps to the same key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from tapio import wire

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


class Record(msgspec.Struct, frozen=True):
    """One forwardable occurrence: key, routing and the encoded document, plus the few fields
    the evidence window filters on (so a query never decodes a document it does not return).
    A Struct, not a dataclass: one is built per ingested event, and its construction in C is a
    fraction of a frozen dataclass's."""

    id: str
    type: str
    node_name: str
    body: bytes
    ts_ns: int = 0
    severity: str = ""
    namespace: str = ""
    pod: str = ""
    workload_kind: str = ""
    workload_name: str = ""

    @property
    def subject(self) -> str:
        return subject_for(self.type)


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


def _content_id(batch: wire.EventBatchRequest, event: wire.WireEvent) -> str:
    digest = hashlib.sha256()
    for part in (batch.agent_id, batch.node_name, event.type, str(event.timestamp_unix_nanos)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(_ENCODER.encode(event.facts))
    return "sha256-" + digest.hexdigest()[:32]


#: Adds fields to an occurrence's data (Kubernetes enrichment); never overwrites agent facts.
Enrich = Callable[[dict[str, Any]], dict[str, Any]]


def build_record(
    batch: wire.EventBatchRequest, event: wire.WireEvent, enrich: Enrich | None = None
) -> Record:
    facts = event.facts if isinstance(event.facts, dict) else {"value": event.facts}
    occurrence_id = _text(facts.get("occurrence_id"))
    if occurrence_id is None or len(occurrence_id) > _MAX_ID_CHARS:
        occurrence_id = _content_id(batch, event)
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
    doc = ForwardedOccurrence(
        id=occurrence_id,
        timestamp=rfc3339_nanos(event.timestamp_unix_nanos),
        timestamp_unix_nanos=event.timestamp_unix_nanos,
        source="tapio",
        type=event.type,
        severity=event.severity.value,
        outcome=_text(facts.get("outcome")) or "unknown",
        observer=event.observer,
        node_name=batch.node_name,
        agent_id=batch.agent_id,
        data=data,
        error=error,
    )
    return record_of(doc)


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
    return [build_record(batch, event, enrich) for event in batch.events]
