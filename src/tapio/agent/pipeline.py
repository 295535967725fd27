"""The data path after the rings: classification → enrichment → fan-out → sinks, as anyio tasks.

The drainer (:class:`tapio.bpf.ringbuf.Drainer`) hands each observer's frames to its
:func:`classify_loop`; every classified batch then passes the one :class:`Enricher` and is
offered to every sink's :class:`SinkLane` by :func:`fanout_loop`. Channel items are batches,
never single events (an item per event costs several times more). Draining → classification
applies backpressure (classification is CPU-only; if it falls behind, the ring fills and the
BPF side counts lost events). Fan-out → sinks never waits: each sink has its own bounded lane
and a full lane is a counted drop for that sink only, so a slow or dead sink cannot stall
draining.

Every drop here is counted where it happens, with its own reason:

* ``tapio_observer_drops_total{observer,reason="classifier_error"}`` — the classifier raised,
  the payload's records are dropped (``unknown_record_type`` and ``not_an_anomaly`` are counted
  by the observers themselves, at the record; a record too short for its struct is counted by
  the drainer as ``tapio_malformed_events_total``);
* ``tapio_sink_drops_total{sink,reason="queue_full"}`` — the fan-out lane into that sink was
  full (a network sink's own buffer is a different queue and counts ``buffer_full``);
* ``tapio_sink_drops_total{sink,reason="sink_stopped"}`` — the sink's task is gone.
"""

from __future__ import annotations

import operator
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tapio.bpf.loader import BpfObject
from tapio.bpf.ringbuf import Drainer, RingBuffer, RingSource
from tapio.metrics import ANOMALIES, ENRICHMENT_ERRORS
from tapio.observers.base import Observer
from tapio.observers.cgroups import (
    ID_KEYS,
    ByCgroupId,
    ByCgroupPath,
    CgroupResolver,
    Enrichment,
    Miss,
    cgroup_facts,
    memo_key,
)
from tapio.observers.cgroups.watch import CgroupWatcher, keep_indexed
from tapio.occurrence import Occurrence, OccurrenceError
from tapio.sinks.base import Batch, Sink

log = structlog.get_logger("tapio.agent.pipeline")


@dataclass
class RunningObserver:
    """An observer whose object is loaded and attached."""

    observer: Observer
    obj: BpfObject | None
    ring: RingBuffer | None
    state: str = "running"
    error: str = ""
    kernel_counts: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.observer.name


@dataclass
class PipelineStats:
    """Totals for the shutdown log line (the Prometheus counters carry the same facts).

    One instance per running agent, created and owned by the runtime and handed to the stages
    that count into it, so two agents in one process (tests) never share totals.
    """

    anomalies: int = 0


_type_of = operator.attrgetter("type")


def count_anomalies(observer: str, batch: Sequence[Occurrence], stats: PipelineStats) -> None:
    """Count a classified batch by anomaly type. A batch is almost always of one type (a burst
    of one kind of record): the distinct types are one set built in C, and only a batch of
    several types is counted type by type."""
    stats.anomalies += len(batch)
    types = set(map(_type_of, batch))
    by_type = {types.pop(): len(batch)} if len(types) == 1 else Counter(map(_type_of, batch))
    for anomaly_type, n in by_type.items():
        ANOMALIES.labels(observer=observer, anomaly_type=anomaly_type).inc(n)


async def classify_loop(
    ro: RunningObserver,
    payloads: MemoryObjectReceiveStream[bytes],
    out: MemoryObjectSendStream[Batch],
    stats: PipelineStats,
) -> None:
    observer = ro.observer
    async with payloads, out:
        async for payload in payloads:
            try:
                batch = observer.classify(payload)
            except Exception:  # a classifier bug must not take the agent down
                log.exception("classification failed; batch dropped", observer=ro.name)
                observer.drop("classifier_error", len(payload) // observer.record.stride)
                continue
            if batch:
                count_anomalies(ro.name, batch, stats)
                await out.send(batch)


MEMO_TTL_SECS = 5.0  # facts for one id tuple are reused this long (ids can be reused)
MEMO_SIZE = 4096


class Enricher:
    """The enrichment stage: cgroup facts per anomaly type, as each observer asks for them
    (:mod:`tapio.observers.cgroups.facts`), from one resolver with one bounded cache.

    The observers say what the kernel said; this adds what the node's cgroup files say. It runs
    first in the fan-out task, for classified batches and for what observers emit from ``run``
    alike; a lookup that misses walks the hierarchy in a worker thread, so it may slow fan-out
    but never the drain timer. It never costs the evidence: if it raises, the occurrence is
    delivered as classified and ``tapio_enrichment_errors_total`` counts it.
    """

    def __init__(
        self,
        resolver: CgroupResolver,
        specs: Mapping[str, Enrichment],
        watcher: CgroupWatcher | None = None,
        *,
        watch: bool = True,
    ) -> None:
        """``watch=False`` leaves cgroups to the periodic re-index and miss walks alone."""
        self.resolver = resolver
        self.watcher: CgroupWatcher | None = None
        if watch:
            self.watcher = watcher if watcher is not None else CgroupWatcher(resolver)
        self.specs = dict(specs)
        self._memo: dict[tuple[object, object], tuple[dict[str, object], str | None]] = {}
        self._memo_at = time.monotonic()
        #: data keys in arrival order → a dict of None with those keys sorted ({}: already are)
        self._orders: dict[tuple[str, ...], dict[str, Any]] = {}

    @classmethod
    def for_specs(
        cls, specs: Iterable[Mapping[str, Enrichment]], resolver: CgroupResolver | None = None
    ) -> Enricher:
        merged: dict[str, Enrichment] = {}
        for s in specs:
            merged.update(s)
        return cls(resolver if resolver is not None else CgroupResolver(), merged)

    @property
    def needs_ids(self) -> bool:
        return any(isinstance(s, ByCgroupId) for s in self.specs.values())

    async def run(self) -> None:
        """While some observer reports cgroup ids: keep the resolver's index current."""
        if self.needs_ids:
            await keep_indexed(self.resolver, self.watcher)

    async def enrich(self, batch: Sequence[Occurrence]) -> None:
        """Enrich ``batch`` in place; ids the cache does not know are walked for off-loop.

        A batch under load is thousands of occurrences from a handful of cgroups, so the cache
        is asked once per distinct (type, ids) in the batch, not once per occurrence, and each
        occurrence then costs one memo lookup and one ``dict.update``.
        """
        fast: list[tuple[Occurrence, dict[str, Any], ByCgroupId, tuple[object, object]]] = []
        todo: list[tuple[Occurrence, Enrichment, tuple[object, object] | None]] = []
        seen: set[tuple[object, object]] = set()
        missing: set[tuple[str, int]] = set()
        lookup = self.resolver.lookup
        specs = self.specs
        self._expire_memo()
        memo = self._memo
        for occ in batch:
            type_ = occ.type
            spec = specs.get(type_)
            data = occ.data
            if spec is None or data is None:
                continue
            if isinstance(spec, ByCgroupPath) or (
                "cgroup_source" in data and data["cgroup_source"] != "task"
            ):
                todo.append((occ, spec, None))
                continue
            try:
                key: tuple[object, object] = (type_, spec.get_ids(data))
            except KeyError:
                key = spec.key_of(type_, data)
            if spec.memory_limit:
                todo.append((occ, spec, key))
            else:
                hit = memo.get(key)  # memoized facts: every id was resolved
                if hit is not None:
                    # The hot path (see _update): facts that only overwrite keys ``data``
                    # has keep its sorted order; new keys need the sorted copy.
                    size = len(data)
                    data.update(hit[0])
                    if len(data) != size:
                        try:
                            self._sort(occ, data)
                        except Exception:
                            self._failed(occ)
                    continue
                fast.append((occ, data, spec, key))
            if key not in seen:
                seen.add(key)
                for h, cid in spec.ids_of(key).items():
                    if isinstance(lookup(h, cid), Miss):
                        missing.add((h, cid))
        if not todo and not fast:
            return
        if missing:
            try:
                await self.resolver.resolve(missing)
            except Exception:  # unresolved ids are reported unknown below
                log.exception("cgroup walk failed")
        self._expire_memo()
        for occ, data, spec, key in fast:
            try:
                facts = self._memoized(spec, key)[0]
            except Exception:
                self._failed(occ)
            else:
                self._update(occ, data, facts)
        for occ, other, other_key in todo:
            try:
                if isinstance(other, ByCgroupPath):
                    self._by_path(occ, other)
                elif other_key is not None:
                    self._by_key(occ, other, other_key)
                else:
                    self._by_id(occ, other)
            except Exception:
                self._failed(occ)

    def _update(self, occ: Occurrence, data: dict[str, Any], facts: dict[str, object]) -> None:
        """The hot path: a task's own cgroup facts into ``data``. ``data`` arrives with its
        keys sorted (``new_occurrence``): facts that only overwrite keys it has keep that
        order, and only new keys need the sorted copy."""
        try:
            size = len(data)
            data.update(facts)
            if len(data) != size:  # the rule the memo-hit path in enrich inlines
                self._sort(occ, data)
        except Exception:
            self._failed(occ)

    @staticmethod
    def _failed(occ: Occurrence) -> None:
        ENRICHMENT_ERRORS.labels(observer=occ.observer).inc()
        log.exception("enrichment failed; occurrence kept as classified", type=occ.type)

    def _by_key(self, occ: Occurrence, spec: ByCgroupId, key: tuple[object, object]) -> None:
        """A task's own cgroup ids with a memory limit to add: facts reused from the memo."""
        data = occ.data
        assert data is not None
        hit = self._memo.get(key)
        facts, mem_path = hit if hit is not None else self._memoized(spec, key)
        data.update(facts)
        self._limit(occ, data, spec, mem_path)
        self._sort(occ, data)

    def _sort(self, occ: Occurrence, data: dict[str, Any]) -> None:
        """Set ``occ.data`` to ``data`` with its keys sorted, as every encoder emits them.

        An occurrence type's keys are the same from one record to the next, so the sorted order
        is computed once per shape and kept as an empty template: a copy of it updated from
        ``data`` keeps the template's key order and costs a third of rebuilding the dict.
        """
        shape = tuple(data)
        template = self._orders.get(shape)
        if template is None:
            if len(self._orders) >= MEMO_SIZE:
                self._orders.clear()
            order = sorted(shape)
            template = self._orders[shape] = {} if order == list(shape) else dict.fromkeys(order)
        if template:
            sorted_data = template.copy()
            sorted_data.update(data)
            data = sorted_data
        occ.data = data

    def _by_id(self, occ: Occurrence, spec: ByCgroupId) -> None:
        """Ids the kernel could not read (``cgroup_source: unknown``): resolved through /proc."""
        data = occ.data
        assert data is not None
        r = self.resolver
        ids = {h: int(data.get(ID_KEYS[h], 0)) for h in spec.hierarchies}
        mem_path: str | None = None
        if spec.proc_fallback and data.get("cgroup_source") == "unknown":
            by_pid = r.paths_for_pid(int(data.get("pid", 0)))
            paths: dict[str, str | None] = {h: by_pid.get(h) for h in ids}
            if by_pid:
                data["cgroup_source"] = "proc"
                ids = {h: r.id_for_path(h, p) if p is not None else 0 for h, p in paths.items()}
            facts = cgroup_facts(r, ids, paths, spec.order, spec.hierarchies)
            mem_path = paths.get("memory")
        else:
            facts, mem_path = self._memoized(spec, memo_key(occ.type, list(ids.values())))
        data.update(facts)
        self._limit(occ, data, spec, mem_path)
        self._sort(occ, data)

    def _limit(
        self, occ: Occurrence, data: dict[str, Any], spec: ByCgroupId, mem_path: str | None
    ) -> None:
        if spec.memory_limit and data.get("memory_limit_bytes") is None and mem_path is not None:
            limit = self.resolver.memory_limit(mem_path)
            if limit is not None:
                data["memory_limit_bytes"] = limit
                if spec.message is not None and occ.error is not None:
                    occ.error = OccurrenceError(occ.error.code, spec.message(data))

    def _expire_memo(self) -> None:
        # The same few cgroups produce most events; their facts are reused for a few seconds
        # so a cgroup that disappears (or an id that is reused) is not described stale for long.
        now = time.monotonic()
        if now - self._memo_at > MEMO_TTL_SECS or len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
            self._memo_at = now

    def _memoized(
        self, spec: ByCgroupId, key: tuple[object, object]
    ) -> tuple[dict[str, object], str | None]:
        hit = self._memo.get(key)
        if hit is None:
            ids = spec.ids_of(key)
            paths = {h: self.resolver.cached(h, cid) for h, cid in ids.items()}
            facts = cgroup_facts(self.resolver, ids, paths, spec.order, spec.hierarchies)
            hit = (facts, paths.get("memory"))
            if all(not isinstance(self.resolver.lookup(h, c), Miss) for h, c in ids.items()):
                self._memo[key] = hit
        return hit

    def _by_path(self, occ: Occurrence, spec: ByCgroupPath) -> None:
        data = occ.data
        assert data is not None
        r = self.resolver
        changed = False
        path = data.get(spec.path_key)
        if data.get("scope") == "cgroup" and isinstance(path, str):
            facts = r.attribution(path).facts()
            data.update(facts)
            changed = bool(facts)
        pid = data.get(spec.pid_key)
        if isinstance(pid, int) and pid > 0:
            paths = r.paths_for_pid(pid)
            p = paths.get("cpu") or paths.get("unified")
            if p is not None:
                data[spec.pid_path_key] = p
                data.update(r.attribution(p).facts())
                changed = True
        if changed:
            self._sort(occ, data)


@dataclass
class SinkLane:
    """The fan-out's way into one sink: its bounded stream, plus an optional spill.

    Without a spill (``spill_limit`` 0) a full stream drops the batch (``queue_full``). With one,
    the batches that find the stream full are joined into one list of at most ``spill_limit``
    occurrences that :meth:`forward` hands over as a single batch as soon as the sink takes it:
    a sink that is busy gets fewer, larger batches instead of losing the surplus, and only what
    exceeds the bound is dropped. Order is kept (nothing bypasses a non-empty spill).
    """

    sink: Sink
    send: MemoryObjectSendStream[Batch]
    spill_limit: int = 0
    _spill: list[Occurrence] = field(default_factory=list)
    _woken: anyio.Event | None = None
    _closing: bool = False

    def offer(self, batch: Batch) -> None:
        """Hand ``batch`` over without waiting; what does not fit is a counted drop."""
        if not self._spill:
            try:
                self.send.send_nowait(batch)
                return
            except anyio.WouldBlock:
                if not self.spill_limit:
                    self.sink.stats.drop(LANE_FULL, len(batch))
                    return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.sink.stats.drop("sink_stopped", len(batch))
                return
        if len(self._spill) + len(batch) > self.spill_limit:
            self.sink.stats.drop(LANE_FULL, len(batch))
            return
        self._spill.extend(batch)
        if self._woken is not None:
            self._woken.set()

    async def forward(self) -> None:
        """Hand the spill over whenever it holds something; returns after :meth:`finish`."""
        while True:
            self._woken = woken = anyio.Event()
            while self._spill:
                batch, self._spill = self._spill, []
                try:
                    await self.send.send(batch)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self.sink.stats.drop("sink_stopped", len(batch))
            if self._closing:
                return
            await woken.wait()

    def finish(self) -> None:
        """No more offers: :meth:`forward` returns once the spill is handed over."""
        self._closing = True
        if self._woken is not None:
            self._woken.set()


#: A sink lane's spill holds up to ``channel_batches`` times this many occurrences (65,536 by
#: default): a burst the sink cannot keep up with waits there instead of being dropped.
LANE_SPILL_PER_BATCH = 1024

#: The drop reason of a full fan-out lane (a sink's own buffer counts ``buffer_full``).
LANE_FULL = "queue_full"


def drainer_for(
    observers: Sequence[RunningObserver], interval: float, max_per_tick: int
) -> Drainer:
    """The one drainer for the running observers' rings. It parks only when every object
    with a watched ring has a ``tapio_wake`` flag to be woken through."""
    sources = [
        RingSource(ro.name, ro.ring, ro.observer.record.size)
        for ro in observers
        if ro.ring is not None
    ]
    side = [side for ro in observers for side in ro.observer.side_rings()]
    owners = [ro for ro in observers if ro.ring is not None or ro.observer.side_rings()]
    flags = [ro.obj.maps.get("tapio_wake") if ro.obj is not None else None for ro in owners]
    fds = [m.fd for m in flags if m is not None]
    if not owners or len(fds) != len(owners):
        fds = []
    return Drainer(sources, interval, max_per_tick, side=side, wake_fds=fds)


def enricher_for(observers: Sequence[RunningObserver]) -> Enricher:
    """The one enrichment stage for the running observers (one shared cgroup resolver)."""
    specs = [ro.observer.enrichment for ro in observers]
    needs = any(spec for spec in specs)
    return Enricher.for_specs(specs, CgroupResolver() if needs else CgroupResolver({}))


async def fanout_loop(
    batches: MemoryObjectReceiveStream[Batch],
    lanes: Sequence[SinkLane],
    enricher: Enricher | None = None,
) -> None:
    """Enrich each batch, then offer it to every sink lane without waiting."""
    try:
        async with batches, anyio.create_task_group() as tg:
            if enricher is not None:
                tg.start_soon(enricher.run)
            async with anyio.create_task_group() as forwarders:
                for lane in lanes:
                    if lane.spill_limit:
                        forwarders.start_soon(lane.forward)
                async for batch in batches:
                    if enricher is not None:
                        await enricher.enrich(batch)
                    for lane in lanes:
                        lane.offer(batch)
                for lane in lanes:
                    lane.finish()  # each forwarder returns once its spill is handed over
            tg.cancel_scope.cancel()  # the periodic cgroup index ends with the data path
    finally:
        for lane in lanes:
            await lane.send.aclose()
