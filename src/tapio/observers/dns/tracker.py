"""The DNS side of the network observer in userspace: drain, sweep, flood control, emit.

The kernel sends only failed and slow answers, on their own ring (``dns_events``, separate from
the TCP records so each ring keeps one fixed record size). A query nobody answers never
produces a packet, so its evidence is found here: the pending map is walked and entries older
than the timeout are deleted, every ``SWEEP_SECS`` while the last walk found queries pending, and
one timeout after a walk that found none (a query that came later cannot be due before that).
The delete is the claim: the kernel deletes an entry before reporting its answer, so a query
becomes exactly one of answer or timeout, never both. The LRU map forgets the oldest pending
queries when full; how many is computed at each sweep from the kernel's counters (tracked -
answered - expired - still pending) and counted as ``dns_query_evicted``.

Nothing here runs on a timer while DNS is quiet: the agent's drainer watches the DNS ring with
the others and calls :meth:`DnsTracker.wake` when records are pending there; while records come
or flood groups are open, the ring is polled every ``POLL_SECS``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import structlog

from tapio.bpf.abi import METRIC_OBSERVER_BASE, TapioConfig
from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import BpfObject, Map
from tapio.bpf.ringbuf import RingBuffer
from tapio.observers.dns.classify import classify_event
from tapio.observers.dns.flood import FloodControl
from tapio.observers.dns.record import DNS_EVENT, DNS_KEY, DNS_QUERY, timeout_record
from tapio.occurrence import Occurrence
from tapio.thresholds import DEFAULTS, Thresholds

log = structlog.get_logger("tapio.observers.dns")

POLL_SECS = 0.1
SWEEP_SECS = 0.25
IDLE_SECS = 60.0  # DNS not configured: only a wake (records, a config) has work for the loop
MAX_PER_POLL = 4096
METRIC_TRACKED = METRIC_OBSERVER_BASE + 8
METRIC_ANSWERED = METRIC_OBSERVER_BASE + 9

Emit = Callable[[Sequence[Occurrence]], Awaitable[None]]


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # the clock of bpf_ktime_get_ns


class DnsTracker:
    def __init__(
        self,
        boot_offset_ns: int,
        comm: Callable[[bytes], str],
        drop: Callable[[str, int], None],
    ) -> None:
        self.boot_offset_ns = boot_offset_ns
        self._comm = comm
        self._drop = drop
        self.flood = FloodControl(DEFAULTS.dns_window_ms * 1_000_000, DEFAULTS.dns_cap, drop)
        self.timeout_ns = DEFAULTS.dns_timeout_ms * 1_000_000
        self.generation = 0
        self.active = False
        self._ring: RingBuffer | None = None
        self._pending: Map | None = None
        self._metrics: Map | None = None
        self._expired = 0
        self._evicted = 0
        self._live = 0  # queries pending at the last sweep
        self._woken: anyio.Event | None = None
        self._sweep_now = True

    def bind(self, obj: BpfObject) -> bool:
        """Use the object's DNS maps; False when the DNS programs are not loaded here."""
        events, pending = obj.maps.get("dns_events"), obj.maps.get("dns_pending")
        if events is None or pending is None:
            return False
        self._ring = RingBuffer.open(events.fd, events.max_entries)
        self._pending = pending
        self._metrics = obj.maps.get("tapio_metrics")
        return True

    def configure(self, kernel: TapioConfig, user: Thresholds) -> None:
        self.generation = kernel.generation
        self.active = kernel.abi_version != 0 and bool(kernel.dns_flags & 1)
        self.timeout_ns = user.dns_timeout_ms * 1_000_000
        self.flood.configure(user.dns_window_ms * 1_000_000, user.dns_cap)
        self._sweep_now = True  # a shorter timeout may make pending queries due at once
        self.wake()

    def side_rings(self) -> list[tuple[RingBuffer, Callable[[], None]]]:
        """The DNS ring for the agent's drainer, which calls :meth:`wake` when it holds records."""
        return [(self._ring, self.wake)] if self._ring is not None else []

    def wake(self) -> None:
        """Records are pending on the ring (or the config changed): run the loop now."""
        if self._woken is not None:
            self._woken.set()

    def _drop1(self, reason: str) -> None:
        self._drop(reason, 1)

    def classify(self, records: Sequence[tuple[object, ...]], now_ns: int) -> list[Occurrence]:
        """Decoded ``dns_event`` field tuples through classification and flood control."""
        out: list[Occurrence] = []
        for fields in records:
            item = classify_event(fields, self.boot_offset_ns, self._comm, self._drop1)
            if item is not None and (occ := self.flood.add(item, now_ns)) is not None:
                out.append(occ)
        return out

    def drain(self) -> list[tuple[object, ...]]:
        if self._ring is None:
            return []
        drained = self._ring.consume_fixed(DNS_EVENT.size, MAX_PER_POLL)
        if drained.malformed:
            self._drop("dns_malformed_record", drained.malformed)
        return [frame[1:] for frame in DNS_EVENT.iter_frames(drained.frames)]

    def sweep(self, now_ns: int) -> list[tuple[object, ...]]:
        """Expire pending queries older than the timeout; their ``dns_event`` field tuples."""
        pending = self._pending
        if pending is None:
            return []
        # tracked before the walk, answered after it: a query that comes or goes meanwhile can
        # only make the eviction count lag, never run ahead (it catches up at the next sweep)
        tracked = self._metric(METRIC_TRACKED)
        expired: list[tuple[bytes, bytes]] = []
        live = 0
        key: bytes | None = None
        for _ in range(pending.max_entries + 1):  # the walk is bounded by the map's size
            key = pending.next_key(key)
            if key is None:
                break
            value = pending.lookup(key)
            if value is None:
                continue
            live += 1
            if now_ns - int.from_bytes(value[:8], "little") >= self.timeout_ns:
                expired.append((key, value))
        out = []
        for key, value in expired:
            if pending.delete(key):  # the claim: the kernel may have taken it for an answer
                self._expired += 1
                live -= 1
                record = timeout_record(key, value, now_ns, self.generation)
                out.append(DNS_EVENT.struct.unpack(record))
        self._live = max(live, 0)
        evicted = tracked - self._metric(METRIC_ANSWERED) - self._expired - max(live, 0)
        if evicted > self._evicted:
            self._drop("dns_query_evicted", evicted - self._evicted)
            self._evicted = evicted
        return out

    def _metric(self, index: int) -> int:
        return self._metrics.percpu_u64_sum(index) if self._metrics is not None else 0

    async def run(self, emit: Emit) -> None:
        """Drain the ring, sweep the pending map when due, emit what flood control lets out;
        sleep until the next of: a poll while busy, the next sweep, a :meth:`wake`."""
        if self._ring is None:
            return
        next_sweep = 0.0
        try:
            while True:
                self._woken = woken = anyio.Event()
                now = monotonic_ns()
                records = self.drain()
                if self.active and (self._sweep_now or time.monotonic() >= next_sweep):
                    self._sweep_now = False
                    try:
                        records += self.sweep(now)
                    except BpfError as exc:
                        log.warning("dns pending sweep failed", error=str(exc))
                    quiet = self.timeout_ns / 1e9 if not self._live else SWEEP_SECS
                    next_sweep = now / 1e9 + quiet  # both clocks are CLOCK_MONOTONIC
                batch = self.classify(records, now) + self.flood.due(now)
                if batch:
                    await emit(batch)
                if records or len(self.flood):
                    delay = POLL_SECS
                elif self.active:
                    delay = max(0.0, next_sweep - time.monotonic())
                else:
                    delay = IDLE_SECS
                with anyio.move_on_after(delay):
                    await woken.wait()
        finally:
            self._woken = None
            rest = self.flood.due(0, everything=True)
            if rest:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    try:
                        await emit(rest)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        self._drop("dns_unsent_at_shutdown", len(rest))

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._pending = None
        self._metrics = None


# re-exported for the layout tests
__all__ = ["DNS_KEY", "DNS_QUERY", "DnsTracker"]
