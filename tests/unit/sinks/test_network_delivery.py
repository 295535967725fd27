"""Retry, drop and shutdown semantics shared by the HTTP and OTLP sinks, against real receivers."""

from __future__ import annotations

import time

import anyio
import pytest

from .conftest import (
    Counts,
    Recorded,
    ids_of,
    make_sink,
    occ,
    running,
    stalled_receiver,
    start_receiver,
)

KINDS = ["http", "otlp"]


@pytest.mark.parametrize("kind", KINDS)
async def test_503_then_200_retries_same_batch_without_duplicates_or_loss(kind: str) -> None:
    def responder(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (503, {}, b"busy") if n == 1 else (200, {}, b"")

    counts = Counts(kind)
    sent = [occ(i) for i in range(7)]
    async with start_receiver(responder) as rx:
        sink = make_sink(kind, rx.url, batch_size=7, flush_interval_secs=10)
        async with running(sink) as send:
            send.send_nowait(sent)
            await rx.wait_for(2)
    assert sink.healthy
    assert len(rx.requests) == 2  # one failure, one success, nothing else
    first, second = (ids_of(kind, r) for r in rx.requests)
    assert first == second == [o.id for o in sent]
    d = counts.delta()
    assert d["ok"] == 7
    assert d["retries"] == 1
    assert d["err"] == 0
    assert all(d[r] == 0 for r in Counts.REASONS)


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_after_is_honoured(kind: str) -> None:
    def responder(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (429, {"Retry-After": "1"}, b"") if n == 1 else (200, {}, b"")

    async with start_receiver(responder) as rx:
        # Jittered backoff alone would retry after <= 50 ms; Retry-After asks for 1 s (cap 5 s).
        sink = make_sink(kind, rx.url, batch_size=1, backoff_max_secs=5.0)
        async with running(sink) as send:
            send.send_nowait([occ(1)])
            await rx.wait_for(2)
    gap = rx.requests[1].at - rx.requests[0].at
    assert 0.95 <= gap < 3.0
    assert ids_of(kind, rx.requests[0]) == ids_of(kind, rx.requests[1])


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_after_is_capped_by_backoff_max(kind: str) -> None:
    def responder(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (503, {"Retry-After": "3600"}, b"") if n == 1 else (200, {}, b"")

    async with start_receiver(responder) as rx:
        sink = make_sink(kind, rx.url, batch_size=1, backoff_max_secs=0.2)
        async with running(sink) as send:
            send.send_nowait([occ(1)])
            await rx.wait_for(2, within=3)
    assert rx.requests[1].at - rx.requests[0].at < 1.5


@pytest.mark.parametrize("kind", KINDS)
async def test_client_error_is_rejected_without_retry(kind: str) -> None:
    counts = Counts(kind)
    async with start_receiver(lambda n, r: (400, {}, b"bad")) as rx:
        sink = make_sink(kind, rx.url, batch_size=3)
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(3)])
            await rx.wait_for(1)
            await anyio.sleep(0.2)
    assert len(rx.requests) == 1
    assert sink.last_error == "rejected: HTTP 400"
    d = counts.delta()
    assert d["rejected"] == 3 and d["err"] == 3 and d["ok"] == 0 and d["retries"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_retries_exhausted_after_max_retries(kind: str) -> None:
    counts = Counts(kind)
    async with start_receiver(lambda n, r: (500, {}, b"")) as rx:
        sink = make_sink(kind, rx.url, batch_size=2, max_retries=3)
        async with running(sink) as send:
            send.send_nowait([occ(1), occ(2)])
            await rx.wait_for(4)
            await anyio.sleep(0.3)
    assert len(rx.requests) == 4  # 1 attempt + 3 retries
    assert not sink.healthy and sink.last_error == "retries_exhausted: HTTP 500"
    d = counts.delta()
    assert d["retries_exhausted"] == 2 and d["retries"] == 3 and d["ok"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_transport_error_retried_then_counted(kind: str) -> None:
    # Nothing listens on this port: connection refused is a retryable transport error.
    async with start_receiver() as rx:
        dead_url = rx.url
    counts = Counts(kind)
    sink = make_sink(kind, dead_url, batch_size=1, max_retries=2)
    async with running(sink) as send:
        send.send_nowait([occ(1)])
        with anyio.fail_after(5):
            while counts.delta()["retries_exhausted"] < 1:
                await anyio.sleep(0.02)
    d = counts.delta()
    assert d["retries"] == 2 and d["retries_exhausted"] == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_stalled_receiver_never_blocks_the_producer_and_counts_drops(kind: str) -> None:
    counts = Counts(kind)
    produced = 0
    slowest = 0.0
    async with stalled_receiver() as url:
        sink = make_sink(
            kind,
            url,
            batch_size=5,
            buffer_max_events=20,
            timeout_secs=0.4,
            max_retries=1,
            shutdown_timeout_secs=0.5,
        )
        started = time.monotonic()
        async with running(sink, buffer=4) as send:
            for i in range(300):
                t0 = time.perf_counter()
                send.send_nowait([occ(i)])  # WouldBlock would mean the sink stopped receiving
                slowest = max(slowest, time.perf_counter() - t0)
                produced += 1
                await anyio.sleep(0.005)
            assert sink.held <= 20
        elapsed = time.monotonic() - started
    assert produced == 300
    assert slowest < 0.01
    d = counts.delta()
    assert d["ok"] == 0
    assert d["buffer_full"] > 0
    # Every occurrence is accounted for: dropped for a counted reason, none vanished.
    assert d["buffer_full"] + d["retries_exhausted"] + d["shutdown"] == 300
    assert d["err"] == 300
    # Shutdown was bounded by shutdown_timeout_secs (plus the producing loop itself).
    assert elapsed < 300 * 0.005 + 6


@pytest.mark.parametrize("kind", KINDS)
async def test_final_flush_on_shutdown(kind: str) -> None:
    counts = Counts(kind)
    sent = [occ(i) for i in range(4)]
    async with start_receiver() as rx:
        # Neither the count (100) nor the time (60 s) trigger fires: only the shutdown flush.
        sink = make_sink(kind, rx.url, batch_size=100, flush_interval_secs=60)
        async with running(sink) as send:
            send.send_nowait(sent)
            await anyio.sleep(0.2)
            assert rx.requests == []
    assert [i for r in rx.requests for i in ids_of(kind, r)] == [o.id for o in sent]
    assert counts.delta()["ok"] == 4


@pytest.mark.parametrize("kind", KINDS)
async def test_shutdown_against_dead_receiver_is_bounded_and_counted(kind: str) -> None:
    counts = Counts(kind)
    async with stalled_receiver() as url:
        sink = make_sink(
            kind, url, batch_size=100, timeout_secs=30, max_retries=5, shutdown_timeout_secs=0.3
        )
        t0 = time.monotonic()
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(6)])
        elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert counts.delta()["shutdown"] == 6
    assert sink.held == 0
