"""The evidence window: the recent enriched occurrences the controller forwarded, in memory.

Tapio is not a store: the window answers "what happened in the cluster lately" (``GET
/v1/evidence``, ``tapio recent --controller``, MCP at ``/mcp``) and forgets. Three bounds, each
enforced on every insert (oldest arrivals leave first, counted by bound):

* ``max_events`` occurrences (default 50,000);
* ``max_age`` seconds since the controller accepted an occurrence (default 3600);
* ``max_bytes`` of accounted memory (default 64 MiB). Each occurrence is charged the size of
  what it holds of its document (the encoded document, or the event JSON it is built from
  while no output has needed it; see :class:`~tapio.controller.forward.record.Record`) and
  of each string the window filters on (``sys.getsizeof``: what the
  objects occupy, whatever their characters), plus a fixed ``ENTRY_OVERHEAD`` for the objects
  that hold them; ``benchmarks/evidence_window.py`` measures the real memory against this
  bound, so the window stays within ``max_bytes`` whatever the documents look like.

Entries keep the document as the bytes every output received (no second copy), or the event
it is built from, and the few fields a query filters on, so a query decodes and encodes only
what it returns. An occurrence id seen
already (an agent re-sent a batch after a lost answer) is not added twice.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from tapio.cli import store
from tapio.cli.remote import record_from_doc
from tapio.controller.forward.record import Record
from tapio.controller.metrics import ControllerMetrics

DEFAULT_MAX_EVENTS: Final = 50_000
DEFAULT_MAX_AGE: Final = 3600.0
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
#: Accounted per entry on top of its document and strings: the entry tuple, the Record, the
#: arrival time and size, the timestamp int, the deque slot and the id set's slot (measured
#: 298 bytes with 200,000 entries on CPython 3.11; the margin covers the set table doubling).
ENTRY_OVERHEAD: Final = 384

#: The record's strings whose size is accounted on top of its document.
_STRING_FIELDS: Final = (
    "id",
    "type",
    "node_name",
    "severity",
    "namespace",
    "pod",
    "workload_kind",
    "workload_name",
)
#: The entry overhead plus the object headers of the document and event (bytes) and of those
#: strings.
_FIXED_COST: Final = (
    ENTRY_OVERHEAD + 2 * sys.getsizeof(b"") + len(_STRING_FIELDS) * sys.getsizeof("")
)

Key = tuple[int, str]
"""(timestamp ns, id): the order queries page in, newest first."""


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Record]
    matched: int


def cost(rec: Record) -> int:
    # The strings are ids, types and DNS-1123 names: ASCII, whose size is its length plus the
    # fixed header, so summing lengths is exact for them and a fraction of the getsizeof calls
    # (a non-ASCII string would take up to 4 bytes a character; the document, the bulk of an
    # entry, is counted exactly either way).
    # Written out rather than summed over _STRING_FIELDS: this runs once per ingested event.
    return (
        _FIXED_COST
        + len(rec.body)
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


def _keys_match(flt: store.Filter, rec: Record) -> bool:
    return flt.matches_keys(
        rec.ts_ns,
        rec.type,
        rec.severity,
        rec.node_name,
        rec.namespace,
        rec.pod,
        (rec.workload_kind, rec.workload_name),
    )


class EvidenceWindow:
    def __init__(
        self,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_age: float = DEFAULT_MAX_AGE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_events < 1 or max_bytes < 1 or not max_age > 0:
            raise ValueError("evidence window bounds must be positive")
        self.max_events = max_events
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.clock = clock
        self._entries: deque[tuple[float, int, Record]] = deque()
        self._ids: set[str] = set()
        self.bytes = 0
        self._evicted: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict_one(self, reason: str) -> None:
        _, size, rec = self._entries.popleft()
        self._ids.discard(rec.id)
        self.bytes -= size
        self._evicted[reason] += 1

    def expire(self) -> None:
        """Drop what is older than ``max_age`` (also done on every insert and query)."""
        cutoff = self.clock() - self.max_age
        while self._entries and self._entries[0][0] < cutoff:
            self._evict_one("age")
        self._publish()

    def _publish(self) -> None:
        # Evictions are counted per call, not per record: a full window evicts one entry per
        # insert, and a labelled counter increment per entry was a tenth of the ingest CPU.
        if self.metrics is not None:
            for reason, n in self._evicted.items():
                self.metrics.window_evicted.labels(reason).inc(n)
            self.metrics.window_events.set(len(self._entries))
            self.metrics.window_bytes.set(self.bytes)
        self._evicted.clear()

    def add(self, records: Sequence[Record]) -> None:
        now = self.clock()
        cutoff = now - self.max_age
        entries, ids = self._entries, self._ids
        while entries and entries[0][0] < cutoff:
            self._evict_one("age")
        max_events, max_bytes, total = self.max_events, self.max_bytes, self.bytes
        duplicates = too_big = by_count = by_bytes = 0
        # One pass with the bounds inlined (this runs once per ingested event); the order of
        # checks and evictions is the rule the module docstring states, per record.
        for rec in records:
            rid = rec.id
            if rid in ids:
                duplicates += 1
                continue
            size = cost(rec)
            if size > max_bytes:
                too_big += 1
                continue
            while len(entries) >= max_events:
                _, old_size, old = entries.popleft()
                ids.discard(old.id)
                total -= old_size
                by_count += 1
            while total + size > max_bytes:
                _, old_size, old = entries.popleft()
                ids.discard(old.id)
                total -= old_size
                by_bytes += 1
            entries.append((now, size, rec))
            ids.add(rid)
            total += size
        self.bytes = total
        evicted = self._evicted
        if by_count:
            evicted["count"] += by_count
        if by_bytes or too_big:
            evicted["bytes"] += by_bytes + too_big
        if duplicates and self.metrics is not None:
            self.metrics.window_duplicates.inc(duplicates)
        self._publish()

    # -- queries -------------------------------------------------------------------------------

    def _candidates(self, flt: store.Filter, after: Key | None) -> Iterator[Record]:
        for _, _, rec in self._entries:
            if after is not None and (rec.ts_ns, rec.id) >= after:
                continue
            if _keys_match(flt, rec):
                yield rec

    def _full_match(self, flt: store.Filter, rec: Record) -> store.Record | None:
        try:
            full = record_from_doc(rec.document())
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return full if flt.matches(full) else None

    def query(self, flt: store.Filter, limit: int, after: Key | None = None) -> Page:
        """Newest first (by timestamp, then id), at most ``limit``, after the cursor key."""
        self.expire()
        matched = 0

        def counted() -> Iterator[Record]:
            nonlocal matched
            for rec in self._candidates(flt, after):
                if flt.needs_data and self._full_match(flt, rec) is None:
                    continue
                matched += 1
                yield rec

        top = heapq.nlargest(limit, counted(), key=lambda r: (r.ts_ns, r.id))
        return Page(top, matched)

    def records(self, flt: store.Filter) -> Iterator[store.Record]:
        """Matching occurrences as CLI records (what the MCP tools read), in arrival order."""
        self.expire()
        for rec in list(self._candidates(flt, None)):
            full = self._full_match(flt, rec)
            if full is not None:
                yield full
