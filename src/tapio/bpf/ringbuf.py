"""A BPF ring buffer consumer that copies records in batches, with no per-record callback.

The map is mmap'ed the way libbpf does it: one read-write consumer page, then the read-only
producer page followed by the data area mapped twice, so a record that wraps is still
contiguous. ``consume_fixed`` walks the headers and copies the payloads of one record type into
a single ``bytearray`` that the observer decodes with ``struct.iter_unpack`` in one C call.

Memory ordering: records are published by the kernel with a release store on the header; on
x86-64 (TSO) plain loads observe header-then-data in order. On weakly ordered CPUs this relies
on the same data dependency libbpf's C consumer uses (header load before payload copy).
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
    payload: bytearray  # ``count`` records of ``record_size`` bytes, back to back
    count: int
    malformed: int  # records shorter than record_size (dropped)
    capped: bool  # stopped at max_records with more pending


class RingBuffer:
    def __init__(self, map_fd: int, max_entries: int) -> None:
        if max_entries & (max_entries - 1):
            raise ValueError("ring buffer size must be a power of two")
        self.fd = map_fd
        self.size = max_entries
        self._mask = max_entries - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._prod = mmap.mmap(
                map_fd, page + 2 * max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._cons.close()
            raise
        self._page = page
        self._view: memoryview | None = memoryview(self._prod)

    def pending_bytes(self) -> int:
        return _U64.unpack_from(self._prod, 0)[0] - _U64.unpack_from(self._cons, 0)[0]

    def consume_fixed(self, record_size: int, max_records: int) -> Drained:
        """Copy up to ``max_records`` records; longer records are truncated (trailing bytes are
        a newer ABI's additions), shorter ones are counted as malformed and skipped."""
        view = self._view
        if view is None:
            raise ValueError("ring buffer is closed")
        cons = _U64.unpack_from(self._cons, 0)[0]
        prod = _U64.unpack_from(self._prod, 0)[0]
        out = bytearray()
        if cons >= prod:
            return Drained(out, 0, 0, False)
        base = self._page
        mask = self._mask
        unpack_hdr = _U32.unpack_from
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
                    out += view[off + HDR_SIZE : off + HDR_SIZE + record_size]
                    count += 1
                else:
                    malformed += 1
            cons += (length + HDR_SIZE + 7) & ~7
        _U64.pack_into(self._cons, 0, cons)
        return Drained(out, count, malformed, capped)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            self._prod.close()
            self._cons.close()
