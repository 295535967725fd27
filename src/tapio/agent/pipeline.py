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

import asyncio
import select
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tapio.bpf.loader import BpfObject
from tapio.bpf.ringbuf import RingBuffer, WakeFlag
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


#: After this long of empty drain passes the drainer parks: no drain timer, the rings' own
#: wakeups instead (each object's ``tapio_wake`` flag, ``bpf/tapio_common.h``).
PARK_AFTER_SECS = 1.0
#: The parked drainer's safety pass: a record that races the parking itself (the flag store
#: and the producer's read of it crossing) waits at most this long.
PARKED_PASS_SECS = 1.0


class Drainer:
    """Drains every ring on one epoll fd: woken by forced BPF wakeups or by the drain timer.

    Awake, the drain timer (``interval``) bounds a record's wait; the BPF side submits without a
    wakeup (a wakeup per record costs the producer's CPU ~6 us of irq_work) and forces one only
    when a ring fills. After ``PARK_AFTER_SECS`` of empty passes, and when every ring's object
    has a ``tapio_wake`` flag, the drainer parks: it sets the flags, looks at the rings once more
    (a record that came before the flag was seen is drained, not slept on) and then waits for a
    ring's wakeup, with a ``PARKED_PASS_SECS`` safety pass. A submit that finds the flag set lets
    the kernel wake the consumer when the ring was empty before it, so the first record after a
    quiet spell wakes the agent at once and the ones behind it do not; the agent clears the flags
    as soon as it wakes and runs on the timer again. An idle agent so wakes once a second
    instead of ten times.

    Rings that an observer drains itself (``Observer.side_rings``, the DNS ring) are watched
    here too: a pass that finds records pending there calls the observer's callback, so that
    observer needs no timer of its own.
    """

    def __init__(
        self,
        observers: Sequence[RunningObserver],
        interval: float,
        max_per_tick: int,
        stats: PipelineStats,
    ) -> None:
        self.observers = [o for o in observers if o.ring is not None]
        self.side = [side for o in observers for side in o.observer.side_rings()]
        self.interval = interval
        self.max_per_tick = max_per_tick
        self.scope = anyio.CancelScope()
        self.stats = stats
        self.flags: list[WakeFlag] = []  # while running: one per object with rings
        self._park_after = max(1, round(PARK_AFTER_SECS / interval))
        self._activity = 0
        self._events = {o.name: EVENTS.labels(observer=o.name) for o in self.observers}
        self._malformed = {o.name: MALFORMED_EVENTS.labels(observer=o.name) for o in self.observers}
        self._cap = {o.name: DRAIN_CAP.labels(observer=o.name) for o in self.observers}
        self._batch = {o.name: DRAIN_BATCH.labels(observer=o.name) for o in self.observers}
        # Parking needs a wake flag in the object of every ring that is watched.
        owners = [o for o in observers if o.ring is not None or o.observer.side_rings()]
        flags = [o.obj.maps.get("tapio_wake") if o.obj is not None else None for o in owners]
        self._flag_fds = [m.fd for m in flags if m is not None]
        if not owners or len(self._flag_fds) != len(owners):
            self._flag_fds = []

    def rings(self) -> list[RingBuffer]:
        return [o.ring for o in self.observers if o.ring is not None] + [r for r, _ in self.side]

    async def drain_once(self, senders: dict[str, MemoryObjectSendStream[bytes]]) -> bool:
        """One pass over every ring; True when some ring hit the per-tick cap."""
        capped_any = False
        for ring, notify in self.side:
            if ring.pending_bytes():
                self._activity += 1
                notify()
        for ro in self.observers:
            assert ro.ring is not None
            drained = ro.ring.consume_fixed(ro.observer.record.size, self.max_per_tick)
            if drained.malformed:
                self._activity += 1
                self._malformed[ro.name].inc(drained.malformed)
                ro.malformed_total += drained.malformed
                if ro.malformed_total <= 10 or ro.malformed_total & (ro.malformed_total - 1) == 0:
                    log.warning(
                        "malformed ring buffer records dropped",
                        observer=ro.name,
                        total=ro.malformed_total,
                    )
            if drained.records:
                self._activity += 1
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
        flags: list[WakeFlag] = []
        self.flags = flags
        try:
            rings = self.rings()
            for ro in self.observers:
                assert ro.ring is not None
                ep.register(ro.ring.fd, select.EPOLLIN)
            # Edge-triggered: a side ring stays readable until its owner drained it, and a
            # level-triggered fd would wake this loop again and again until then.
            for ring, _ in self.side:
                ep.register(ring.fd, select.EPOLLIN | select.EPOLLET)
            flags.extend(WakeFlag(fd) for fd in self._flag_fds)
            with self.scope, Readiness(ep.fileno()) as ready:
                empty, parked = 0, False
                while True:
                    await ready.wait(PARKED_PASS_SECS if parked else self.interval)
                    if parked:
                        for flag in flags:
                            flag.set(False)
                        parked = False
                    ep.poll(0)  # re-arms level-triggered readiness of the rings
                    before = self._activity
                    if await self.drain_once(senders):
                        empty = 0
                        await anyio.lowlevel.checkpoint()
                        continue
                    empty = 0 if self._activity != before else empty + 1
                    if flags and empty >= self._park_after:
                        parked = self._park(flags, rings, ep)
            # Shutdown: everything already in the rings still reaches the sinks.
            with anyio.CancelScope(shield=True):
                for _ in range(64):
                    if not await self.drain_once(senders):
                        break
        finally:
            for flag in flags:
                flag.set(False)
                flag.close()
            self.flags = []
            ep.close()
            for s in senders.values():
                await s.aclose()

    @staticmethod
    def _park(flags: list[WakeFlag], rings: list[RingBuffer], ep: select.epoll) -> bool:
        """Set the wake flags, then look at the rings again: True when they are still empty
        (parked), False (flags cleared) when a record came in the meantime."""
        for flag in flags:
            flag.set(True)
        # A syscall that takes the epoll lock between the flag stores and the ring reads below
        # keeps x86 from reading the rings before the stores are visible to the producers.
        ep.poll(0)
        if any(ring.pending_bytes() for ring in rings):
            for flag in flags:
                flag.set(False)
            return False
        return True


class Readiness:
    """Readability of one fd, registered with the event loop once for the drainer's lifetime.

    ``anyio.wait_readable`` adds and removes the fd from the loop's selector on every call (two
    ``epoll_ctl`` calls and the selector's bookkeeping per drain pass, several percent of the
    agent's CPU under a burst). On asyncio the fd is added once with ``add_reader`` and each
    wait is one future and one timer handle: the idle agent wakes ten times a second for the
    drain timer, and an anyio cancel scope plus event per wait cost twice as much CPU as that
    (measured: 0.26 % against 0.13 % of a core for the bare wakeups). Cancellation still comes
    from the enclosing anyio scope (it cancels the task, which cancels the future). Other
    backends fall back to ``wait_readable``.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fired = False
        self._waiter: asyncio.Future[None] | None = None

    def __enter__(self) -> Readiness:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): wait_readable per call
            return self
        loop.add_reader(self.fd, self._ready)
        self._loop = loop
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    def _ready(self) -> None:
        self._fired = True
        _resolve(self._waiter)

    async def wait(self, secs: float) -> None:
        """Return when the fd was readable since the last call, or after ``secs``."""
        loop = self._loop
        if loop is None:
            with anyio.move_on_after(secs):
                await anyio.wait_readable(self.fd)
            return
        if not self._fired:
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(secs, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        self._fired = False


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


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
