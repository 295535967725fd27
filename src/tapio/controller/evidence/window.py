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

Each insert is one batch, kept as one chunk: the common batch (new ids, room for its bytes)
costs a few C-level steps whatever its size (its ids added as a set, the count bound applied
once, whole chunks evicted at a time), not a Python step per occurrence; any other batch is
kept record by record, by the same rule.
"""

from __future__ import annotations

import heapq
import operator
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from tapio.cli import store
from tapio.cli.remote import record_from_doc
from tapio.controller.forward.record import Record, held_bytes
from tapio.controller.metrics import ControllerMetrics

DEFAULT_MAX_EVENTS: Final = 50_000
DEFAULT_MAX_AGE: Final = 3600.0
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
#: Accounted per entry on top of its document and strings: the Record, its timestamp and size
#: ints, its slots in its chunk's two lists and in the id set, a share of the chunk (measured
#: 298 bytes with 200,000 entries on CPython 3.11 when each entry was a tuple of its own in a
#: deque, which cost more; the margin covers the set table doubling).
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

_ID: Final = operator.attrgetter("id")
_HELD: Final = operator.attrgetter("held")

Key = tuple[int, str]
"""(timestamp ns, id): the order queries page in, newest first."""


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Record]
    matched: int


def cost(rec: Record) -> int:
    """What the window charges for a record: what it holds, plus the fixed overhead."""
    return _FIXED_COST + (rec.held or held_bytes(rec))


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


class _Chunk:
    """The records one ``add`` kept, oldest first, their accounted sizes and arrival time: the
    window appends one chunk per batch and evicts whole chunks (or a chunk's oldest part)."""

    __slots__ = ("arrived", "bytes", "records", "sizes")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.records: list[Record] = []
        self.sizes: list[int] = []
        self.bytes = 0


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
        self._chunks: deque[_Chunk] = deque()
        self._ids: set[str] = set()
        self._count = 0
        self.bytes = 0
        self._evicted: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._count

    def _drop_oldest(self, n: int, reason: str) -> None:
        """Evict the ``n`` oldest records (at most as many as the window holds); a chunk
        emptied this way leaves, unless it is the one being filled."""
        self._evicted[reason] += n
        self._count -= n
        chunks, ids = self._chunks, self._ids
        while n:
            chunk = chunks[0]
            records = chunk.records
            if n >= len(records):
                n -= len(records)
                ids.difference_update(map(_ID, records))
                self.bytes -= chunk.bytes
                if len(chunks) > 1:
                    chunks.popleft()
                else:  # the chunk being filled: emptied, kept
                    records.clear()
                    chunk.sizes.clear()
                    chunk.bytes = 0
                continue
            ids.difference_update(map(_ID, records[:n]))
            freed = sum(chunk.sizes[:n])
            del records[:n], chunk.sizes[:n]  # the evicted records are freed now
            chunk.bytes -= freed
            self.bytes -= freed
            n = 0

    def _expire(self, now: float) -> None:
        cutoff = now - self.max_age
        chunks = self._chunks
        while chunks and chunks[0].arrived < cutoff:
            chunk = chunks.popleft()
            self._ids.difference_update(map(_ID, chunk.records))
            self._count -= len(chunk.records)
            self.bytes -= chunk.bytes
            self._evicted["age"] += len(chunk.records)

    def expire(self) -> None:
        """Drop what is older than ``max_age`` (also done on every insert and query)."""
        self._expire(self.clock())
        self._publish()

    def _publish(self) -> None:
        # Evictions are counted per call, not per record: a full window evicts one entry per
        # insert, and a labelled counter increment per entry was a tenth of the ingest CPU.
        if self.metrics is not None:
            for reason, n in self._evicted.items():
                if n:
                    self.metrics.window_evicted.labels(reason).inc(n)
            self.metrics.window_events.set(self._count)
            self.metrics.window_bytes.set(self.bytes)
        self._evicted.clear()

    def add(self, records: Sequence[Record]) -> None:
        """Keep ``records`` (one batch) as the newest, evicting by the bounds, oldest first.

        The common batch (no id seen before, the whole batch fits the byte bound without
        evicting anything for bytes) is kept with a handful of batch-level steps: one chunk
        appended, the ids added as a set, the count bound applied once. Anything else takes
        the record-by-record path, which the fast one is equivalent to."""
        now = self.clock()
        self._expire(now)
        chunk = _Chunk(now)
        sizes = list(map(_HELD, records))  # what ingest computed with the batch, if it did
        sizes = list(map(cost, records)) if 0 in sizes else list(map(_FIXED_COST.__add__, sizes))
        batch_bytes = sum(sizes)
        new_ids = set(map(_ID, records))
        if (
            len(new_ids) == len(records)
            and self.bytes + batch_bytes <= self.max_bytes
            and self._ids.isdisjoint(new_ids)
        ):
            if records:
                chunk.records = list(records)
                chunk.sizes = sizes
                chunk.bytes = batch_bytes
                self._chunks.append(chunk)
                self._ids |= new_ids
                self._count += len(records)
                self.bytes += batch_bytes
                excess = self._count - self.max_events
                if excess > 0:
                    self._drop_oldest(excess, "count")
        else:
            self._chunks.append(chunk)
            self._add_each(chunk, records, sizes)
            if not chunk.records:
                self._chunks.pop()
        self._publish()

    def _add_each(self, chunk: _Chunk, records: Sequence[Record], sizes: list[int]) -> None:
        # The rule the module docstring states, record by record: a known id is skipped, a
        # record larger than the whole bound is not kept, then the count bound, then the bytes.
        ids, max_events, max_bytes = self._ids, self.max_events, self.max_bytes
        duplicates = 0
        for rec, size in zip(records, sizes, strict=True):
            if rec.id in ids:
                duplicates += 1
                continue
            if size > max_bytes:
                self._evicted["bytes"] += 1
                continue
            if self._count >= max_events:
                self._drop_oldest(self._count - max_events + 1, "count")
            while self.bytes + size > max_bytes:
                self._drop_oldest(1, "bytes")
            chunk.records.append(rec)
            chunk.sizes.append(size)
            chunk.bytes += size
            ids.add(rec.id)
            self._count += 1
            self.bytes += size
        if duplicates and self.metrics is not None:
            self.metrics.window_duplicates.inc(duplicates)

    # -- queries -------------------------------------------------------------------------------

    def _candidates(self, flt: store.Filter, after: Key | None) -> Iterator[Record]:
        for chunk in list(self._chunks):
            for rec in chunk.records:
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
