"""How the controller decodes an agent's event batch: once, into the narrowest shape that proves
the batch's facts valid, so validating it costs a few batch-level steps instead of a walk.

Three decoders, tried in turn; the first that succeeds gives the batch, and any body the
narrower ones refuse (a bad one included) is decoded as :class:`~tapio.wire.EventBatchRequest`,
which gives the error it always gave:

* **clean** (what Tapio agents send): each event's facts decoded as :data:`FactKeys`, which
  keeps only the keys the controller reads (the occurrence id, the pod and workload names)
  and fails on any reasoning key; the body's brackets prove the facts flat (one ``[``, the
  events array, and one ``{`` for the batch and two per event: no object or array inside
  any facts), and the body is checked as UTF-8 once. Nothing else of the facts is built: the
  record keeps the event's JSON, and the document is made from it when something sends it.
* **flat**: every facts an object of scalars (decoded as such), whose keys are checked.
* anything else: any facts, walked event by event by ``validate``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import msgspec

from tapio import wire
from tapio.reasoning import REASONING_KEYS

Scalar = str | int | float | bool | None

#: The facts the controller reads at ingest; anything else in them is skipped while decoding.
KEPT_FACTS: Final = ("occurrence_id", "pod_namespace", "pod_name", "workload_kind", "workload_name")

#: An event's facts as the clean decoder reads them: the kept facts (``UNSET`` when absent) and
#: every reasoning key typed so that no value fits (its presence fails the decoder).
FactKeys: Final = msgspec.defstruct(
    "FactKeys",
    [(name, Any, msgspec.UNSET) for name in KEPT_FACTS]
    + [(name, msgspec.UnsetType, msgspec.UNSET) for name in sorted(REASONING_KEYS)],
    gc=False,
)


class _FlatWireEvent(wire.WireEvent):
    facts: dict[str, Scalar]


class FlatEventBatch(wire.EventBatchRequest):
    """Every event's facts proved an object of scalars (no nested object can hide a reasoning
    key)."""

    events: list[_FlatWireEvent]  # type: ignore[assignment]
    facts_proven: ClassVar[str] = "flat"


class _CleanWireEvent(wire.WireEvent):
    facts: FactKeys  # type: ignore[valid-type]


class CleanEventBatch(wire.EventBatchRequest):
    """Every event's facts proved an object of scalars without a reasoning key, of which only
    :data:`KEPT_FACTS` were decoded (see :func:`full`)."""

    events: list[_CleanWireEvent]  # type: ignore[assignment]
    facts_proven: ClassVar[str] = "clean"


_CLEAN: Final = msgspec.json.Decoder(CleanEventBatch)
_FLAT: Final = msgspec.json.Decoder(FlatEventBatch)
_NARROW_FAILS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _brackets_prove_flat(raw: bytes, events: int) -> bool:
    # JSON objects and arrays always start with a literal bracket (escapes cannot make one), so
    # these counts leave no room for an object or array inside any facts; a bracket inside a
    # string only makes the proof fail.
    # (Counted by what removing them takes away: several times faster than bytes.count.)
    opening = raw.find(b"[")
    return (
        opening >= 0
        and raw.find(b"[", opening + 1) < 0
        and len(raw) - len(raw.replace(b"{", b"")) == 2 * events + 1
    )


def decode_batch(raw: bytes, *, facts: bool = False) -> wire.EventBatchRequest:
    """The batch in ``raw``, decoded once when it is what agents send (see the module).

    ``facts``: every event's facts are needed whole (the controller enriches them), so the
    clean decoder, which keeps only a few, is skipped rather than run and then redone."""
    if facts:
        return full(raw)
    try:
        clean = _CLEAN.decode(raw)
    except _NARROW_FAILS:
        pass
    else:
        if _brackets_prove_flat(raw, len(clean.events)) and _utf8(raw):
            return clean
    return full(raw)


def _utf8(raw: bytes) -> bool:
    # The values this decoder skips were never made strings, so never checked as UTF-8.
    if raw.isascii():
        return True
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def full(raw: bytes) -> wire.EventBatchRequest:
    """The batch in ``raw`` with every event's facts decoded (what enrichment and the record
    by record path read)."""
    try:
        return _FLAT.decode(raw)
    except _NARROW_FAILS:
        return wire.decode(raw, wire.EventBatchRequest)
