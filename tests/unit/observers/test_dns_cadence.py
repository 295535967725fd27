"""When the DNS tracker's loop runs: no poll timer while DNS is quiet, sweeps one timeout apart
while nothing is pending and every ``SWEEP_SECS`` while something is, and at once on a wake."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import anyio
import pytest

from tapio.bpf.abi import TapioConfig
from tapio.bpf.ringbuf import RingBuffer
from tapio.observers.dns import tracker as tracker_mod
from tapio.observers.dns.tracker import DnsTracker, monotonic_ns
from tapio.occurrence import Occurrence
from tapio.thresholds import Thresholds

from .test_dns_records import FakeMap


def bound(timeout_ms: int) -> tuple[DnsTracker, FakeMap, list[float]]:
    t = DnsTracker(1_000, lambda raw: "x", lambda reason, n: None)
    t.configure(TapioConfig(generation=1, dns_flags=1), Thresholds(dns_timeout_ms=timeout_ms))
    pending = FakeMap({})
    t._ring = RingBuffer(bytearray(4096), bytearray(4096 + 4096), 4096, page=4096)
    t._pending = pending  # type: ignore[assignment]
    sweeps: list[float] = []
    real = t.sweep

    def counted(now_ns: int) -> list[tuple[object, ...]]:
        sweeps.append(time.monotonic())
        return real(now_ns)

    t.sweep = counted  # type: ignore[method-assign]
    return t, pending, sweeps


async def emit_nothing(batch: Sequence[Occurrence]) -> None:
    pass


async def test_quiet_dns_sweeps_once_per_timeout_and_pending_queries_every_sweep_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracker_mod, "SWEEP_SECS", 0.05)
    t, pending, sweeps = bound(timeout_ms=2000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(t.run, emit_nothing)
        await anyio.sleep(0.6)
        assert len(sweeps) == 1  # the first walk found nothing: the next is a timeout later
        # a query in flight (sent now) cannot be due before then either ...
        pending.entries[b"k" * 8] = monotonic_ns().to_bytes(8, "little") + bytes(8)
        await anyio.sleep(0.3)
        assert len(sweeps) == 1
        # ... and once a walk has seen it pending (2 s after the first), walks come every 50 ms
        with anyio.fail_after(5):
            while len(sweeps) < 5:
                await anyio.sleep(0.05)
        gaps = [b - a for a, b in itertools.pairwise(sweeps[1:])]
        assert sweeps[1] - sweeps[0] >= 1.9 and max(gaps) < 1.0, sweeps
        tg.cancel_scope.cancel()


async def test_a_wake_runs_the_loop_at_once() -> None:
    t, _, sweeps = bound(timeout_ms=5000)
    drained: list[float] = []
    real = t.drain

    def counted() -> list[tuple[object, ...]]:
        drained.append(time.monotonic())
        return real()

    t.drain = counted  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(t.run, emit_nothing)
        await anyio.sleep(0.3)
        assert len(drained) == 1  # quiet: no poll timer
        woken = time.monotonic()
        t.wake()
        with anyio.fail_after(2):  # the loop would otherwise sleep until the 5 s sweep
            while len(drained) < 2:
                await anyio.sleep(0.005)
        assert drained[1] - woken < 1.0
        tg.cancel_scope.cancel()
    assert len(sweeps) == 1
