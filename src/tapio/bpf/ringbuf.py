"""BPF ring buffers: a consumer that copies records in batches, and the drainer over all rings.

:class:`RingBuffer` reads one ring with no per-record callback; :class:`Drainer` watches every
ring on one epoll fd and hands each observer's frames to its stream (what libbpf's
``ring_buffer__poll`` does for C consumers, here driven by the event loop and a drain timer).

The map is mmap'ed as two mappings: one read-write consumer page, then the read-only producer
page followed by the data area, mapped **once**. (libbpf maps the data area twice so that a run
of records that wraps is contiguous in memory; every page of a ring mapping counts in the
agent's RSS from the first moment, so the second copy would cost the ring's whole size again,
2 MiB for the network ring. A run that wraps is copied here in two slices instead.) Every record
is framed by the kernel as an 8-byte header (length with BUSY/DISCARD bits, page offset) plus the
payload padded to 8 bytes; a header never wraps (positions and the size are multiples of 8).

Fast path: when every frame between the consumer and producer positions is a committed record
of the observer's own size, the whole run is copied with one slice and later decoded with one
``struct.iter_unpack`` call (see ``CStruct.frame``). Otherwise the slow path walks the headers,
stops at a record still being written, skips discarded ones, counts records shorter than the
struct as malformed, truncates longer ones (a newer ABI's trailing fields) and re-frames them.

Positions: the consumer and producer positions are read and written as one native 8-byte word
through a ``memoryview`` cast, never with ``struct`` ('<Q' packs and unpacks byte by byte). The
kernel reads consumer_pos while the agent writes it: a store done a byte at a time shows it, for
a moment, a position up to 16 MiB behind the real one, and a reserve that sees that position
finds the ring "full" and drops the record although the ring has room.

Memory ordering: records are published by the kernel with a release store on the header; on
x86-64 (TSO) plain loads observe header-then-data in order. On weakly ordered CPUs this relies
on the same dependency libbpf's C consumer uses (header load before payload copy).
"""

from __future__ import annotations

import asyncio
import mmap
import select
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import anyio
import anyio.lowlevel
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from tapio.metrics import DRAIN_BATCH, DRAIN_CAP, EVENTS, MALFORMED_EVENTS

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_U32 = struct.Struct("<I")

log = structlog.get_logger("tapio.bpf.ringbuf")


class Drained(NamedTuple):
    frames: bytes  # ``records`` frames of ``stride`` bytes, decodable with CStruct.iter_frames
    records: int
    malformed: int  # records shorter than the struct (dropped)
    capped: bool  # stopped at max_records with more pending


class RingBuffer:
    """Consumer over the two mappings of a BPF_MAP_TYPE_RINGBUF map.

    ``cons`` is the writable consumer page; ``prod`` is the producer page followed by the data
    area (once, or twice as libbpf maps it: only the first copy is read). Tests pass plain
    ``bytearray`` buffers laid out the same way.
    """

    def __init__(
        self,
        cons: mmap.mmap | bytearray,
        prod: mmap.mmap | bytearray,
        max_entries: int,
        *,
        page: int = mmap.PAGESIZE,
        fd: int = -1,
    ) -> None:
        if max_entries <= 0 or max_entries & (max_entries - 1):
            raise ValueError("ring buffer size must be a power of two")
        if len(prod) < page + max_entries:
            raise ValueError("producer mapping too small")
        self.fd = fd
        self.size = max_entries
        self._mask = max_entries - 1
        self._cons = cons
        self._prod = prod
        self._page = page
        self._view: memoryview | None = memoryview(prod)
        # One aligned 8-byte load or store per access (see the module docstring).
        self._cons_pos = memoryview(cons)[:8].cast("Q")
        self._prod_pos = memoryview(prod)[:8].cast("Q")

    @classmethod
    def open(cls, map_fd: int, max_entries: int) -> RingBuffer:
        """mmap a ring buffer map: the consumer page, then the producer page and the data once."""
        page = mmap.PAGESIZE
        cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            prod = mmap.mmap(
                map_fd, page + max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            cons.close()
            raise
        return cls(cons, prod, max_entries, page=page, fd=map_fd)

    def pending_bytes(self) -> int:
        return int(self._prod_pos[0] - self._cons_pos[0])

    def consume_fixed(self, record_size: int, max_records: int) -> Drained:
        """Take up to ``max_records`` records of ``record_size`` bytes as uniform frames."""
        view = self._view
        if view is None:
            raise ValueError("ring buffer is closed")
        cons: int = self._cons_pos[0]
        prod: int = self._prod_pos[0]
        if cons >= prod:
            return Drained(b"", 0, 0, False)
        stride = (HDR_SIZE + record_size + 7) & ~7
        avail = prod - cons
        n = min(avail // stride, max_records)
        if n and avail % stride == 0:
            frames = self._copy(cons, n * stride)
            headers = memoryview(frames).cast("I")[:: stride // 4].tolist()
            if headers.count(record_size) == n:
                cons += n * stride
                self._cons_pos[0] = cons
                return Drained(frames, n, 0, cons < prod)
        return self._consume_slow(cons, prod, record_size, stride, max_records)

    def _copy(self, pos: int, length: int) -> bytes:
        """``length`` bytes of the data area from ring position ``pos``, across the wrap."""
        view = self._view
        assert view is not None
        start = pos & self._mask
        base = self._page
        end = start + length
        if end <= self.size:
            return bytes(view[base + start : base + end])
        head = bytes(view[base + start : base + self.size])
        return head + bytes(view[base : base + end - self.size])

    def _consume_slow(
        self, cons: int, prod: int, record_size: int, stride: int, max_records: int
    ) -> Drained:
        view = self._view
        assert view is not None
        base = self._page
        mask = self._mask
        unpack_hdr = _U32.unpack_from
        pad = bytes(stride - HDR_SIZE - record_size)
        header = _U32.pack(record_size) + bytes(4)
        out = bytearray()
        count = malformed = 0
        capped = False
        while cons < prod:
            if count + malformed >= max_records:
                capped = True
                break
            off = base + (cons & mask)
            hdr = unpack_hdr(view, off)[0]
            if hdr & BUSY_BIT:
                break
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            if not hdr & DISCARD_BIT:
                if length >= record_size:
                    out += header
                    out += self._copy(cons + HDR_SIZE, record_size)
                    out += pad
                    count += 1
                else:
                    malformed += 1
            cons += (length + HDR_SIZE + 7) & ~7
        self._cons_pos[0] = cons
        return Drained(bytes(out), count, malformed, capped)

    def close(self) -> None:
        if self._view is not None:
            self._cons_pos.release()
            self._prod_pos.release()
            self._view.release()
            self._view = None
            if isinstance(self._prod, mmap.mmap):
                self._prod.close()
            if isinstance(self._cons, mmap.mmap):
                self._cons.close()


class WakeFlag:
    """An object's ``tapio_wake`` map (one ``__u32``, ``BPF_F_MMAPABLE``), mapped writable.

    Non-zero while the agent is parked: the object's submits then let the kernel wake the
    consumer when it has caught up (``bpf/tapio_common.h``). One store, no syscall.
    """

    def __init__(self, map_fd: int) -> None:
        self._mm: mmap.mmap | None = mmap.mmap(
            map_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )

    def set(self, parked: bool) -> None:
        if self._mm is not None:
            _U32.pack_into(self._mm, 0, 1 if parked else 0)

    def is_set(self) -> bool:
        return self._mm is not None and _U32.unpack_from(self._mm, 0)[0] != 0

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


@dataclass(eq=False, slots=True)
class RingSource:
    """One ring the drainer reads: whole records of ``record_size`` go, framed, to the stream
    named ``name`` (the observer that owns the ring)."""

    name: str
    ring: RingBuffer
    record_size: int
    malformed_total: int = 0


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
        sources: Sequence[RingSource],
        interval: float,
        max_per_tick: int,
        *,
        side: Sequence[tuple[RingBuffer, Callable[[], None]]] = (),
        wake_fds: Sequence[int] = (),
    ) -> None:
        """``side``: rings drained by their owner, with the callback that tells it to.
        ``wake_fds``: the ``tapio_wake`` maps of every object whose rings are watched; parking
        is off unless the caller passes them all (a ring nobody can wake keeps the timer)."""
        self.sources = list(sources)
        self.side = list(side)
        self.interval = interval
        self.max_per_tick = max_per_tick
        self.scope = anyio.CancelScope()
        self.records = 0  # every record drained, for the agent's shutdown line
        self.flags: list[WakeFlag] = []  # while running: one per object with rings
        self._park_after = max(1, round(PARK_AFTER_SECS / interval))
        self._activity = 0
        self._events = {s.name: EVENTS.labels(observer=s.name) for s in self.sources}
        self._malformed = {s.name: MALFORMED_EVENTS.labels(observer=s.name) for s in self.sources}
        self._cap = {s.name: DRAIN_CAP.labels(observer=s.name) for s in self.sources}
        self._batch = {s.name: DRAIN_BATCH.labels(observer=s.name) for s in self.sources}
        self._flag_fds = list(wake_fds)

    def rings(self) -> list[RingBuffer]:
        return [s.ring for s in self.sources] + [r for r, _ in self.side]

    async def drain_once(self, senders: dict[str, MemoryObjectSendStream[bytes]]) -> bool:
        """One pass over every ring; True when some ring hit the per-tick cap."""
        capped_any = False
        for ring, notify in self.side:
            if ring.pending_bytes():
                self._activity += 1
                notify()
        for src in self.sources:
            drained = src.ring.consume_fixed(src.record_size, self.max_per_tick)
            if drained.malformed:
                self._activity += 1
                self._malformed[src.name].inc(drained.malformed)
                src.malformed_total += drained.malformed
                total = src.malformed_total
                if total <= 10 or total & (total - 1) == 0:
                    log.warning(
                        "malformed ring buffer records dropped", observer=src.name, total=total
                    )
            if drained.records:
                self._activity += 1
                self.records += drained.records
                self._events[src.name].inc(drained.records)
                self._batch[src.name].observe(drained.records)
                await senders[src.name].send(drained.frames)
            if drained.capped:
                self._cap[src.name].inc()
                capped_any = True
        return capped_any

    async def run(self, senders: dict[str, MemoryObjectSendStream[bytes]]) -> None:
        """Drain until ``scope`` is cancelled, then drain what is left and close the senders."""
        ep = select.epoll()
        flags: list[WakeFlag] = []
        self.flags = flags
        try:
            rings = self.rings()
            for src in self.sources:
                ep.register(src.ring.fd, select.EPOLLIN)
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
