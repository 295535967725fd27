"""The data path: ring buffers → classification → enrichment → fan-out → sinks, as anyio tasks.

Channel items are batches, never single events (one channel item per event costs several times
more than per batch). Draining → classification applies backpressure (classification is
CPU-only; if it falls behind, the kernel ring fills and the BPF side counts lost events).
Enrichment runs first in the fan-out task, for classified batches and for what observers emit
from ``run`` alike; a cgroup lookup that misses awaits a walk in a worker thread, so it may slow
fan-out but never the drain timer. Fan-out → sinks never waits: each sink has its own bounded
stream and a full stream is a counted drop for that sink only, so a slow or dead sink cannot
stall draining.

Every drop here is counted where it happens, with its own reason:

* ``tapio_malformed_events_total{observer}`` — a ring record too short for its struct;
* ``tapio_observer_drops_total{observer,reason="classifier_error"}`` — the classifier raised,
  the payload's records are dropped (``unknown_record_type`` and ``not_an_anomaly`` are counted
  by the observers themselves, at the record);
* ``tapio_sink_drops_total{sink,reason="queue_full"}`` — the fan-out lane into that sink was
  full (a network sink's own buffer is a different queue and counts ``buffer_full``);
* ``tapio_sink_drops_total{sink,reason="sink_stopped"}`` — the sink's task is gone.
"""

from __future__ import annotations

import select
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tapio.bpf.loader import BpfObject
from tapio.bpf.ringbuf import RingBuffer
from tapio.metrics import ANOMALIES, DRAIN_BATCH, DRAIN_CAP, EVENTS, MALFORMED_EVENTS
from tapio.observers.base import Observer
from tapio.observers.cgroups import CgroupResolver
from tapio.observers.enrich import Enricher
from tapio.occurrence import Occurrence
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
    malformed_total: int = 0

    @property
    def name(self) -> str:
        return self.observer.name


@dataclass
class PipelineStats:
    """Totals for the shutdown log line (the Prometheus counters carry the same facts).

    One instance per running agent, created and owned by the runtime and handed to the stages
    that count into it, so two agents in one process (tests) never share totals.
    """

    events: int = 0
    anomalies: int = 0


def count_anomalies(observer: str, batch: Sequence[Occurrence], stats: PipelineStats) -> None:
    stats.anomalies += len(batch)
    by_type = Counter(occ.type for occ in batch)
    for anomaly_type, n in by_type.items():
        ANOMALIES.labels(observer=observer, anomaly_type=anomaly_type).inc(n)


class Drainer:
    """Drains every ring on one epoll fd: woken by forced BPF wakeups or by the drain timer."""

    def __init__(
        self,
        observers: Sequence[RunningObserver],
        interval: float,
        max_per_tick: int,
        stats: PipelineStats,
    ) -> None:
        self.observers = [o for o in observers if o.ring is not None]
        self.interval = interval
        self.max_per_tick = max_per_tick
        self.scope = anyio.CancelScope()
        self.stats = stats
        self._events = {o.name: EVENTS.labels(observer=o.name) for o in self.observers}
        self._malformed = {o.name: MALFORMED_EVENTS.labels(observer=o.name) for o in self.observers}
        self._cap = {o.name: DRAIN_CAP.labels(observer=o.name) for o in self.observers}
        self._batch = {o.name: DRAIN_BATCH.labels(observer=o.name) for o in self.observers}

    async def drain_once(self, senders: dict[str, MemoryObjectSendStream[bytes]]) -> bool:
        """One pass over every ring; True when some ring hit the per-tick cap."""
        capped_any = False
        for ro in self.observers:
            assert ro.ring is not None
            drained = ro.ring.consume_fixed(ro.observer.record.size, self.max_per_tick)
            if drained.malformed:
                self._malformed[ro.name].inc(drained.malformed)
                ro.malformed_total += drained.malformed
                if ro.malformed_total <= 10 or ro.malformed_total & (ro.malformed_total - 1) == 0:
                    log.warning(
                        "malformed ring buffer records dropped",
                        observer=ro.name,
                        total=ro.malformed_total,
                    )
            if drained.records:
                self.stats.events += drained.records
                self._events[ro.name].inc(drained.records)
                self._batch[ro.name].observe(drained.records)
                await senders[ro.name].send(drained.frames)
            if drained.capped:
                self._cap[ro.name].inc()
                capped_any = True
        return capped_any

    async def run(self, senders: dict[str, MemoryObjectSendStream[bytes]]) -> None:
        """Drain until ``scope`` is cancelled, then drain what is left and close the senders."""
        ep = select.epoll()
        try:
            for ro in self.observers:
                assert ro.ring is not None
                ep.register(ro.ring.fd, select.EPOLLIN)
            with self.scope:
                while True:
                    with anyio.move_on_after(self.interval):
                        await anyio.wait_readable(ep.fileno())
                    ep.poll(0)  # re-arms level-triggered readiness of the rings
                    if await self.drain_once(senders):
                        await anyio.lowlevel.checkpoint()
            # Shutdown: everything already in the rings still reaches the sinks.
            with anyio.CancelScope(shield=True):
                for _ in range(64):
                    if not await self.drain_once(senders):
                        break
        finally:
            ep.close()
            for s in senders.values():
                await s.aclose()


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


@dataclass
class SinkLane:
    sink: Sink
    send: MemoryObjectSendStream[Batch]


#: The drop reason of a full fan-out lane (a sink's own buffer counts ``buffer_full``).
LANE_FULL = "queue_full"


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
            async for batch in batches:
                if enricher is not None:
                    await enricher.enrich(batch)
                for lane in lanes:
                    try:
                        lane.send.send_nowait(batch)
                    except anyio.WouldBlock:
                        lane.sink.stats.drop(LANE_FULL, len(batch))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        lane.sink.stats.drop("sink_stopped", len(batch))
            tg.cancel_scope.cancel()  # the periodic cgroup index ends with the data path
    finally:
        for lane in lanes:
            await lane.send.aclose()
