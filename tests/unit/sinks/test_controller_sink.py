"""Controller sink: WireEvent mapping, sequence numbers, batching, retries, drops, final flush.

Receivers are real aiohttp servers on 127.0.0.1 (a recording one for scripted answers, the real
``tapio.controller`` app for end-to-end acceptance and sequence tracking).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

import anyio
import pytest
from aiohttp import web

from tapio import wire
from tapio.controller import Controller
from tapio.occurrence import Occurrence, new_occurrence
from tapio.sinks.controller import (
    ControllerSink,
    build_body,
    timestamp_unix_nanos,
    to_wire_event,
)
from tapio.transport import ControllerLink, make_link

from .conftest import Recorded, drops, occ, running, sample, stalled_receiver, start_receiver

OK_BODY = wire.encode(
    wire.EventBatchResponse(
        wire_version=wire.WIRE_VERSION, accepted=1, rejected=0, next_config_version="1"
    )
)


def ok(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, OK_BODY


def link_to(url: str, *, registered: bool = True, max_batch: int = 256) -> ControllerLink:
    link = make_link(url, "node/test", "test")
    link.registered = registered
    link.apply_batching(20, max_batch)  # 20 ms send interval: tests do not wait for timers
    return link


def fast_sink(link: ControllerLink, **kw: object) -> ControllerSink:
    opts: dict[str, object] = {
        "backoff_base": 0.01,
        "backoff_max": 0.02,
        "connect_timeout": 2.0,
        "timeout": 2.0,
        "shutdown_timeout": 2.0,
    }
    opts.update(kw)
    return ControllerSink(link, **opts)  # type: ignore[arg-type]


def batches_of(rx_requests: list[Recorded]) -> list[wire.EventBatchRequest]:
    return [wire.decode(r.body, wire.EventBatchRequest) for r in rx_requests]


def seq_of(e: wire.WireEvent) -> int:
    return int(e.facts["seq"])


def failures() -> float:
    return sample("tapio_controller_send_failures_total", kind="events")


# ---- mapping ----------------------------------------------------------------------------------


def test_wire_event_mapping_carries_facts_id_outcome_and_error() -> None:
    o = new_occurrence(
        "kernel.network.connection_refused",
        "warning",
        "failure",
        timestamp_ns=1_795_000_000_123_456_789,
        code="RST_RECEIVED",
        message="TCP RST",
        data={"dst_port": 5, "comm": "x"},
    )
    ev = to_wire_event(o)
    assert ev.type == "kernel.network.connection_refused"
    assert ev.observer == "network"
    assert ev.severity is wire.EventSeverity.WARNING
    assert ev.timestamp_unix_nanos == 1_795_000_000_123_456_789
    assert ev.facts == {
        "comm": "x",
        "dst_port": 5,
        "error_code": "RST_RECEIVED",
        "error_message": "TCP RST",
        "occurrence_id": o.id,
        "outcome": "failure",
    }
    assert list(ev.facts) == sorted(ev.facts)
    ev.validate()  # no reasoning key among the additions


def test_wire_event_never_overwrites_a_fact_and_omits_absent_error() -> None:
    o = new_occurrence("kernel.node.cpu_stall", "critical", "unknown", data={"outcome": "kept"})
    ev = to_wire_event(o)
    assert ev.facts["outcome"] == "kept"
    assert "error_code" not in ev.facts and ev.facts["occurrence_id"] == o.id
    assert ev.observer == "node" and ev.severity is wire.EventSeverity.CRITICAL


@pytest.mark.parametrize("bad", ["kernel.network", "user.network.x", "kernel..x", "a.b.c.d"])
def test_non_kernel_types_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"kernel\.<observer>\.<anomaly>"):
        to_wire_event(new_occurrence(bad, "info", "unknown"))


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("2026-11-23T14:30:36.123456789+00:00", 1795444236123456789),
        ("2026-11-23T14:30:36.5Z", 1795444236500000000),
        ("2026-11-23T14:30:36Z", 1795444236000000000),
        ("2026-11-23T16:30:36.000000001+02:00", 1795444236000000001),
        ("yesterday", 0),
        ("2026-13-23T14:30:36Z", 0),
        ("2026-11-23T14:30:36.1234567890Z", 0),
    ],
)
def test_timestamp_parsing(text: str, nanos: int) -> None:
    assert timestamp_unix_nanos(text) == nanos


def test_body_is_a_valid_event_batch_request() -> None:
    link = make_link("http://127.0.0.1:1", "node/a", "a")
    events = [wire.encode(to_wire_event(occ(i))) for i in range(3)]
    body = build_body(link, 7, 123, events)
    req = wire.decode(body, wire.EventBatchRequest)
    req.validate(3)
    assert (req.sequence, req.sent_at_unix_nanos, req.agent_id, req.node_name) == (
        7,
        123,
        "node/a",
        "a",
    )
    assert [seq_of(e) for e in req.events] == [0, 1, 2]


def test_endpoint_schemes() -> None:
    assert make_link("https://ctl.example:8443/base/", "a", "n").ssl_context is not None
    assert str(make_link("http://h:1/base/", "a", "n").url("/v1/events")) == (
        "http://h:1/base/v1/events"
    )
    with pytest.raises(ValueError, match="http:// or https://"):
        make_link("ftp://h/", "a", "n")


# ---- delivery ---------------------------------------------------------------------------------


async def test_batches_split_by_count_with_consecutive_sequences() -> None:
    async with start_receiver(ok) as rx:
        sink = fast_sink(link_to(rx.url, max_batch=3))
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(7)])
            await rx.wait_for(3)
    reqs = batches_of(rx.requests)
    assert [len(r.events) for r in reqs] == [3, 3, 1]
    assert [r.sequence for r in reqs] == [1, 2, 3]
    assert [seq_of(e) for r in reqs for e in r.events] == list(range(7))
    for r in rx.requests:
        assert r.path == "/v1/events" and r.headers["Content-Type"] == "application/json"
    for req in reqs:
        req.validate(3)


async def test_batches_split_by_bytes_never_exceed_the_limit() -> None:
    limit = 4096
    async with start_receiver(ok) as rx:
        sink = fast_sink(link_to(rx.url), max_batch_bytes=limit)
        async with running(sink) as send:
            send.send_nowait([occ(i, padding="p" * 900) for i in range(12)])
            await rx.wait_for(3)
    assert len(rx.requests) >= 3
    assert all(len(r.body) <= limit for r in rx.requests)
    reqs = batches_of(rx.requests)
    assert [seq_of(e) for r in reqs for e in r.events] == list(range(12))
    assert [r.sequence for r in reqs] == list(range(1, len(reqs) + 1))


async def test_default_byte_limit_is_the_controller_body_limit() -> None:
    # 256 events of ~1.9 KiB: by count one batch, by bytes (262144) at least two.
    async with start_receiver(ok) as rx:
        sink = fast_sink(link_to(rx.url))
        async with running(sink) as send:
            send.send_nowait([occ(i, padding="q" * 1800) for i in range(256)])
            await rx.wait_for(2)
    assert len(rx.requests) >= 2
    assert all(len(r.body) <= wire.MAX_BODY_BYTES for r in rx.requests)
    assert sum(len(r.events) for r in batches_of(rx.requests)) == 256


async def test_retries_reuse_the_sequence_and_the_next_batch_increments() -> None:
    def flaky(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (503, {}, b"busy") if n <= 2 else ok(n, rec)

    async with start_receiver(flaky) as rx:
        sink = fast_sink(link_to(rx.url, max_batch=2))
        async with running(sink) as send:
            send.send_nowait([occ(0), occ(1)])
            await rx.wait_for(3)
            send.send_nowait([occ(2)])
            await rx.wait_for(4)
    seqs = [r.sequence for r in batches_of(rx.requests)]
    assert seqs == [1, 1, 1, 2]
    assert sink.delivered_sequences == type(sink.delivered_sequences)([1, 2])
    assert sample("tapio_sink_retries_total", sink="controller") >= 2


async def test_exhausted_retries_drop_count_and_leave_a_gap() -> None:
    before_failed, before_fail = drops("controller", "send_failed"), failures()

    def down_first(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (500, {}, b"") if n <= 3 else ok(n, rec)

    async with start_receiver(down_first) as rx:
        sink = fast_sink(link_to(rx.url, max_batch=5), max_retries=2)
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(5)])
            await rx.wait_for(3)
            send.send_nowait([occ(9)])
            await rx.wait_for(4)
    assert [r.sequence for r in batches_of(rx.requests)] == [1, 1, 1, 2]
    assert drops("controller", "send_failed") - before_failed == 5
    assert failures() - before_fail == 1
    assert sink.healthy  # the later delivery cleared the failure


async def test_client_error_is_final_and_counted_as_rejected() -> None:
    before, before_fail = drops("controller", "rejected"), failures()
    envelope = wire.encode(
        wire.WireError.invalid_field("type", "must be a kernel.* event").envelope()
    )

    def refuse(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return 400, {"Content-Type": "application/json"}, envelope

    async with start_receiver(refuse) as rx:
        sink = fast_sink(link_to(rx.url))
        async with running(sink) as send:
            send.send_nowait([occ(0), occ(1)])
            await rx.wait_for(1)
            await anyio.sleep(0.2)
    assert len(rx.requests) == 1
    assert drops("controller", "rejected") - before == 2
    assert failures() - before_fail == 1
    assert not sink.healthy and sink.link.sink_error is not None


async def test_buffer_full_drops_oldest_counted_and_the_final_flush_delivers_the_rest() -> None:
    # One overflow policy for every network sink: the oldest held occurrences go, counted as
    # ``buffer_full`` (``queue_full`` is the agent's fan-out lane, a different queue).
    before, before_lane = drops("controller", "buffer_full"), drops("controller", "queue_full")
    async with start_receiver(ok) as rx:
        # Not registered: the sender holds everything, so the queue bound is what decides.
        sink = fast_sink(link_to(rx.url, registered=False), buffer_max_events=5)
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(8)])
            await anyio.sleep(0.4)
            assert rx.requests == []  # nothing before the first accepted hello
            assert sink.held == 5
    assert drops("controller", "buffer_full") - before == 3
    assert drops("controller", "queue_full") == before_lane
    reqs = batches_of(rx.requests)  # the final flush ignores the registration gate
    assert [seq_of(e) for r in reqs for e in r.events] == [3, 4, 5, 6, 7]


async def test_sending_starts_when_registered() -> None:
    async with start_receiver(ok) as rx:
        link = link_to(rx.url, registered=False)
        sink = fast_sink(link)
        async with running(sink) as send:
            send.send_nowait([occ(0)])
            await anyio.sleep(0.3)
            assert rx.requests == []
            link.registered = True
            await rx.wait_for(1, within=2)


async def test_final_flush_is_bounded_by_the_shutdown_timeout() -> None:
    before = drops("controller", "shutdown")
    async with stalled_receiver() as url:
        sink = fast_sink(link_to(url), shutdown_timeout=0.5, timeout=30.0)
        t0 = time.monotonic()
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(4)])
            await anyio.sleep(0.1)
        elapsed = time.monotonic() - t0
    assert elapsed < 3.0
    assert drops("controller", "shutdown") - before == 4


async def test_non_kernel_occurrence_is_dropped_not_fatal() -> None:
    before = drops("controller", "encode_error")
    async with start_receiver(ok) as rx:
        sink = fast_sink(link_to(rx.url))
        async with running(sink) as send:
            send.send_nowait([new_occurrence("custom.thing", "info", "unknown"), occ(1)])
            await rx.wait_for(1)
    assert drops("controller", "encode_error") - before == 1
    assert [seq_of(e) for r in batches_of(rx.requests) for e in r.events] == [1]


# ---- against the real controller ------------------------------------------------------------


@contextlib.asynccontextmanager
async def real_controller() -> AsyncIterator[tuple[Controller, str]]:
    ctl = Controller()
    runner = web.AppRunner(ctl.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield ctl, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def agent_status(ctl: Controller, agent_id: str) -> wire.AgentStatus:
    return next(a for a in ctl.status_response().agents if a.agent_id == agent_id)


async def test_real_controller_accepts_batches_with_clean_sequence() -> None:
    import aiohttp

    async with real_controller() as (ctl, url):
        link = link_to(url, registered=False)
        hello = wire.HelloRequest(
            wire_version=wire.WIRE_VERSION,
            agent_id=link.agent_id,
            node_name=link.node_name,
            tapio_version="0",
            kernel_release="6",
            arch="x86_64",
        )
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{url}/v1/agents/hello",
                data=wire.encode(hello),
                headers={"Content-Type": "application/json"},
            ) as r,
        ):
            answer = wire.decode(await r.read(), wire.HelloResponse)
        link.apply_batching(20, answer.max_batch_events)
        link.registered = True
        sink = fast_sink(link)
        items: list[Occurrence] = [occ(i) for i in range(300)]
        async with running(sink) as send:
            send.send_nowait(items)
            with anyio.fail_after(5):
                while ctl.state.totals.accepted_events_total < 300:
                    await anyio.sleep(0.02)
        st = agent_status(ctl, link.agent_id)
        assert ctl.state.totals.accepted_events_total == 300
        assert ctl.state.totals.batches_accepted_total == 2  # 256 + 44
        assert st.sequence.last_seen == 2
        assert (st.sequence.gaps_total, st.sequence.regressions_total) == (0, 0)
        assert json.loads(wire.encode(st))["sequence"]["last_seen"] == 2


async def test_occurrence_larger_than_a_batch_is_dropped_as_too_large() -> None:
    before = drops("controller", "too_large")
    async with start_receiver(ok) as rx:
        sink = fast_sink(link_to(rx.url), max_batch_bytes=4096)
        async with running(sink) as send:
            send.send_nowait([occ(0, padding="x" * 5000), occ(1)])
            await rx.wait_for(1)
    assert drops("controller", "too_large") - before == 1
    assert [seq_of(e) for r in batches_of(rx.requests) for e in r.events] == [1]


async def test_retry_after_is_honoured_within_the_backoff_cap() -> None:
    def busy_once(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (503, {"Retry-After": "1"}, b"") if n == 1 else ok(n, rec)

    async with start_receiver(busy_once) as rx:
        # Backoff alone would retry within 20 ms; the controller asked for 1 s (cap 5 s).
        sink = fast_sink(link_to(rx.url), backoff_max=5.0)
        async with running(sink) as send:
            send.send_nowait([occ(0)])
            await rx.wait_for(2)
    assert 0.95 <= rx.requests[1].at - rx.requests[0].at < 3.0
    assert [r.sequence for r in batches_of(rx.requests)] == [1, 1]
