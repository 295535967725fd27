"""The ring-buffer consumer on recorded bytes: fast path, wrap, busy, discard, malformed."""

from __future__ import annotations

import struct

import pytest

from tapio.bpf.ringbuf import BUSY_BIT, DISCARD_BIT, RingBuffer
from tapio.observers.network import NETWORK_EVENT

PAGE = 4096
SIZE = 4096  # data area (power of two)


def make_ring() -> tuple[RingBuffer, bytearray, bytearray]:
    cons = bytearray(PAGE)
    prod = bytearray(PAGE + 2 * SIZE)
    return RingBuffer(cons, prod, SIZE, page=PAGE), cons, prod


class Writer:
    """Emulates the kernel producer, including the double mapping of the data area."""

    def __init__(self, prod: bytearray) -> None:
        self.prod = prod
        self.pos = 0

    def _put(self, off: int, data: bytes) -> None:
        for base in (PAGE + off, PAGE + SIZE + off):
            end = min(base + len(data), len(self.prod))
            self.prod[base:end] = data[: end - base]
        # wrap: bytes past the end of the first copy land at the start of the first copy too
        over = off + len(data) - SIZE
        if over > 0:
            self.prod[PAGE : PAGE + over] = data[len(data) - over :]

    def record(self, payload: bytes, flags: int = 0) -> None:
        hdr = struct.pack("<II", len(payload) | flags, 0)
        off = self.pos & (SIZE - 1)
        self._put(off, hdr + payload)
        self.pos += (len(payload) + 8 + 7) & ~7
        struct.pack_into("<Q", self.prod, 0, self.pos)


def rec(i: int) -> bytes:
    return NETWORK_EVENT.struct.pack(
        i,
        1,
        100 + i,
        100 + i,
        1,
        2,
        1,
        2,
        7,
        1,
        40000 + i,
        9,
        bytes([127, 0, 0, 1]) + bytes(12),
        bytes([127, 0, 0, 1]) + bytes(12),
        111,
        0,
        0,
        0,
        0,
        0,
        0,
        1000,
        b"comm".ljust(16, b"\0"),
        0,
        0,
        0,
    )


def decode(frames: bytes) -> list[int]:
    return [f[NETWORK_EVENT.index["pid"] + 1] for f in NETWORK_EVENT.iter_frames(frames)]


def test_fast_path_takes_a_uniform_run_in_one_copy() -> None:
    ring, cons, prod = make_ring()
    w = Writer(prod)
    for i in range(5):
        w.record(rec(i))
    d = ring.consume_fixed(NETWORK_EVENT.size, 100)
    assert (d.records, d.malformed, d.capped) == (5, 0, False)
    assert decode(d.frames) == [100, 101, 102, 103, 104]
    assert struct.unpack_from("<Q", cons)[0] == w.pos
    assert ring.consume_fixed(NETWORK_EVENT.size, 100).records == 0


def test_cap_is_reported_and_the_rest_waits() -> None:
    ring, _, prod = make_ring()
    w = Writer(prod)
    for i in range(10):
        w.record(rec(i))
    d = ring.consume_fixed(NETWORK_EVENT.size, 4)
    assert (d.records, d.capped) == (4, True)
    d2 = ring.consume_fixed(NETWORK_EVENT.size, 100)
    assert decode(d2.frames) == [104, 105, 106, 107, 108, 109]


def test_short_records_are_malformed_and_dropped() -> None:
    ring, _, prod = make_ring()
    w = Writer(prod)
    w.record(rec(0))
    w.record(rec(1)[:40])  # truncated record
    w.record(b"")  # empty record
    w.record(rec(2))
    d = ring.consume_fixed(NETWORK_EVENT.size, 100)
    assert (d.records, d.malformed) == (2, 2)
    assert decode(d.frames) == [100, 102]


def test_longer_records_are_truncated_to_the_struct() -> None:
    ring, _, prod = make_ring()
    w = Writer(prod)
    w.record(rec(7) + b"\xff" * 24)  # a newer ABI with trailing fields
    d = ring.consume_fixed(NETWORK_EVENT.size, 100)
    assert d.records == 1 and decode(d.frames) == [107]


def test_busy_record_stops_the_walk_and_discarded_is_skipped() -> None:
    ring, cons, prod = make_ring()
    w = Writer(prod)
    w.record(rec(0))
    w.record(rec(1), DISCARD_BIT)
    w.record(rec(2))
    busy_at = w.pos
    w.record(rec(3), BUSY_BIT)
    w.record(rec(4))
    d = ring.consume_fixed(NETWORK_EVENT.size, 100)
    assert decode(d.frames) == [100, 102]
    assert struct.unpack_from("<Q", cons)[0] == busy_at  # resumes at the busy record


def test_wrapping_run_is_contiguous_through_the_double_mapping() -> None:
    ring, _, prod = make_ring()
    w = Writer(prod)
    stride = NETWORK_EVENT.stride
    n_first = SIZE // stride - 1
    for i in range(n_first):
        w.record(rec(i))
    assert ring.consume_fixed(NETWORK_EVENT.size, 1000).records == n_first
    for i in range(3):
        w.record(rec(50 + i))
    d = ring.consume_fixed(NETWORK_EVENT.size, 1000)
    assert decode(d.frames) == [150, 151, 152]


def test_ring_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError):
        RingBuffer(bytearray(PAGE), bytearray(PAGE + 2 * 3000), 3000, page=PAGE)
