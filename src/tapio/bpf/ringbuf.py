"""A BPF ring buffer consumer that copies records in batches, with no per-record callback.

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

Memory ordering: records are published by the kernel with a release store on the header; on
x86-64 (TSO) plain loads observe header-then-data in order. On weakly ordered CPUs this relies
on the same dependency libbpf's C consumer uses (header load before payload copy).
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


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
        return int(_U64.unpack_from(self._prod, 0)[0] - _U64.unpack_from(self._cons, 0)[0])

    def consume_fixed(self, record_size: int, max_records: int) -> Drained:
        """Take up to ``max_records`` records of ``record_size`` bytes as uniform frames."""
        view = self._view
        if view is None:
            raise ValueError("ring buffer is closed")
        cons = _U64.unpack_from(self._cons, 0)[0]
        prod = _U64.unpack_from(self._prod, 0)[0]
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
                _U64.pack_into(self._cons, 0, cons)
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
        _U64.pack_into(self._cons, 0, cons)
        return Drained(bytes(out), count, malformed, capped)

    def close(self) -> None:
        if self._view is not None:
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
