"""Forwarding into a real nats-server with JetStream, through the controller's HTTP routes.

What is shown: each accepted occurrence becomes exactly one stored message with subject
``tapio.evidence.<type>``, ``Nats-Msg-Id`` = occurrence id and the node header; a NATS outage
in the middle of a run loses nothing and duplicates nothing; a full queue answers 503 with
``Retry-After`` and changes no state; SIGTERM-style shutdown drains the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from tapio.controller import Controller
from tapio.controller.forward import Forwarder
from tapio.controller.forward.nats import NatsOutput

from ...ports import closed_port
from .ctl_harness import JSON, batch, capturing_logger, enc, event, hello, running
from .nats_harness import NatsServer, stream_messages, wait_for

REFUSED = "kernel.network.connection_refused"


def refused_batch(seq: int, first: int, n: int, node: str = "node-a") -> dict[str, Any]:
    events = [
        event(
            type=REFUSED,
            facts={
                "occurrence_id": f"01JTEST{i:019d}",
                "outcome": "failure",
                "dst_port": 40_000 + i,
                "dst_addr": "127.0.0.1",
                "pid": 1000 + i,
            },
        )
        for i in range(first, first + n)
    ]
    return batch(sequence=seq, events=events, node_name=node)


class Rig:
    def __init__(self, session: aiohttp.ClientSession, url: str, ctl: Controller) -> None:
        self.session, self.url, self.ctl = session, url, ctl

    async def post(self, path: str, body: Any) -> tuple[int, Any, Any]:
        async with self.session.post(self.url + path, data=enc(body), headers=JSON) as r:
            return r.status, msgspec.json.decode(await r.read()), r.headers

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as r:
            return r.status, msgspec.json.decode(await r.read())

    def metric(self, name: str, *labels: str) -> float:
        value: float = getattr(self.ctl.metrics, name).labels(*labels)._value.get()
        return value


def make_controller(url: str, **kw: Any) -> Controller:
    log, _ = capturing_logger()
    from tapio.controller.metrics import ControllerMetrics

    metrics = ControllerMetrics()
    output = NatsOutput(url, publish_timeout=1.0, logger=log)
    forwarder = Forwarder([output], metrics, log, **kw)
    return Controller(logger=log, metrics=metrics, forwarder=forwarder)


@contextlib.asynccontextmanager
async def rig_for(ctl: Controller) -> AsyncIterator[Rig]:
    async with (
        running(ctl) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
    ):
        yield Rig(s, url, ctl)


@pytest.fixture
def nats_server(tmp_path: Path) -> Any:
    with NatsServer(tmp_path / "js") as server:
        yield server


async def test_50_then_outage_then_50_more_each_exactly_once(nats_server: NatsServer) -> None:
    ctl = make_controller(nats_server.url)
    out = ctl.forwarder.lanes[0].output.name  # type: ignore[union-attr]
    async with rig_for(ctl) as rig:
        await wait_for(lambda: ctl.forwarder.ready, 10, "output ready")  # type: ignore[union-attr]
        assert (await rig.get("/readyz"))[0] == 200
        assert (await rig.post("/v1/agents/hello", hello()))[0] == 200
        for k in range(5):
            code, body, _ = await rig.post("/v1/events", refused_batch(k + 1, k * 10, 10))
            assert code == 200 and body["accepted"] == 10
        await wait_for(lambda: rig.metric("forward_forwarded", out) == 50, 15, "50 forwarded")
        msgs = await stream_messages(nats_server.url)
        assert len(msgs) == 50

        nats_server.stop()
        for k in range(5, 10):  # accepted into the queue while NATS is down
            code, body, _ = await rig.post("/v1/events", refused_batch(k + 1, k * 10, 10))
            assert code == 200 and body["accepted"] == 10
        await wait_for(lambda: not ctl.forwarder.ready, 10, "outage noticed")  # type: ignore[union-attr]
        assert (await rig.get("/readyz"))[0] == 503
        await asyncio.sleep(10)
        assert rig.metric("forward_forwarded", out) == 50
        assert rig.metric("forward_queued", out) == 50
        nats_server.start()
        await wait_for(lambda: rig.metric("forward_forwarded", out) == 100, 30, "100 forwarded")
        assert rig.metric("forward_retried", out) > 0
        # an agent re-sending a batch it did not see acknowledged: stored once all the same
        assert (await rig.post("/v1/events", refused_batch(10, 90, 10)))[0] == 200
        await wait_for(lambda: rig.metric("forward_forwarded", out) == 110, 15, "re-send done")
        assert (await rig.get("/readyz"))[0] == 200

    msgs = await stream_messages(nats_server.url)
    assert len(msgs) == 100
    ids = [m.headers["Nats-Msg-Id"] for m in msgs if m.headers]
    assert sorted(ids) == [f"01JTEST{i:019d}" for i in range(100)]
    for m in msgs:
        doc = msgspec.json.decode(m.data)
        assert m.subject == f"tapio.evidence.{REFUSED}"
        assert m.headers is not None and m.headers["Tapio-Node"] == "node-a"
        assert doc["id"] == m.headers["Nats-Msg-Id"]
        i = int(doc["id"][7:])
        assert doc["type"] == REFUSED and doc["node_name"] == "node-a"
        assert doc["data"] == {"dst_addr": "127.0.0.1", "dst_port": 40_000 + i, "pid": 1000 + i}
        assert doc["outcome"] == "failure"
    m = ctl.metrics
    assert m.forward_dropped.labels(out, "shutdown")._value.get() == 0
    assert m.events_refused.labels("queue_full")._value.get() == 0


async def test_full_queue_answers_503_retry_after_and_changes_nothing(
    nats_server: NatsServer,
) -> None:
    nats_server.stop()  # down from the start: nothing leaves the queue
    ctl = make_controller(nats_server.url, queue_max_events=20)
    out = ctl.forwarder.lanes[0].output.name  # type: ignore[union-attr]
    async with rig_for(ctl) as rig:
        assert (await rig.get("/readyz"))[0] == 503
        assert (await rig.post("/v1/agents/hello", hello()))[0] == 200
        assert (await rig.post("/v1/events", refused_batch(1, 0, 15)))[0] == 200
        before = (await rig.get("/v1/status"))[1]
        code, body, headers = await rig.post("/v1/events", refused_batch(2, 15, 10))
        assert code == 503 and body["error"]["code"] == "QUEUE_FULL"
        assert headers["Retry-After"] == "1"
        after = (await rig.get("/v1/status"))[1]
        for s in (before, after):
            s["agents"][0].pop("last_heartbeat_age_seconds")
        assert after == before  # sequence 2 not seen: the agent's retry is not a regression
        assert ctl.metrics.events_refused.labels("queue_full")._value.get() == 10
        assert rig.metric("forward_queued", out) == 15
        nats_server.start()
        await wait_for(lambda: rig.metric("forward_forwarded", out) == 15, 30, "drained")
        code, body, _ = await rig.post("/v1/events", refused_batch(2, 15, 10))  # the retry
        assert code == 200
        await wait_for(lambda: rig.metric("forward_forwarded", out) == 25, 15, "retry stored")
        status = (await rig.get("/v1/status"))[1]
        assert status["agents"][0]["sequence"]["regressions_total"] == 0
    assert len(await stream_messages(nats_server.url)) == 25


async def test_shutdown_drains_the_queue_within_the_grace(nats_server: NatsServer) -> None:
    nats_server.stop()
    ctl = make_controller(nats_server.url, drain_grace=20.0)
    out = ctl.forwarder.lanes[0].output.name  # type: ignore[union-attr]
    async with rig_for(ctl) as rig:
        assert (await rig.post("/v1/agents/hello", hello()))[0] == 200
        assert (await rig.post("/v1/events", refused_batch(1, 0, 30)))[0] == 200
        nats_server.start()  # comes back only as the controller is told to stop
    # leaving the server context ran the app's cleanup: the drain
    assert ctl.metrics.forward_forwarded.labels(out)._value.get() == 30
    assert ctl.metrics.forward_dropped.labels(out, "shutdown")._value.get() == 0
    assert len(await stream_messages(nats_server.url)) == 30


async def test_shutdown_grace_exceeded_counts_the_drop(tmp_path: Path) -> None:
    ctl = make_controller(f"nats://127.0.0.1:{closed_port()}", drain_grace=0.5)  # no server
    out = ctl.forwarder.lanes[0].output.name  # type: ignore[union-attr]
    async with rig_for(ctl) as rig:
        assert (await rig.post("/v1/agents/hello", hello()))[0] == 200
        assert (await rig.post("/v1/events", refused_batch(1, 0, 7)))[0] == 200
    assert ctl.metrics.forward_dropped.labels(out, "shutdown")._value.get() == 7
    assert ctl.metrics.forward_forwarded.labels(out)._value.get() == 0


async def test_existing_stream_is_used_and_subjects_stay_literal(nats_server: NatsServer) -> None:
    ctl = make_controller(nats_server.url)
    out = ctl.forwarder.lanes[0].output.name  # type: ignore[union-attr]
    async with rig_for(ctl) as rig:
        assert (await rig.post("/v1/agents/hello", hello()))[0] == 200
        odd = batch(events=[event(type="kernel.x y.*>", facts={"occurrence_id": "odd-1"})])
        assert (await rig.post("/v1/events", odd))[0] == 200
        await wait_for(lambda: rig.metric("forward_forwarded", out) == 1, 15, "odd forwarded")
    msgs = await stream_messages(nats_server.url)
    assert [m.subject for m in msgs] == ["tapio.evidence.kernel.x_y.__"]


async def test_two_replicas_into_one_stream_store_each_occurrence_once(
    nats_server: NatsServer,
) -> None:
    """Two controllers behind one Service: an agent whose batch reached replica A but whose
    answer was lost re-sends it, and the retry lands on replica B. JetStream keeps one copy."""
    a, b = make_controller(nats_server.url), make_controller(nats_server.url)
    out = a.forwarder.lanes[0].output.name  # type: ignore[union-attr]
    async with rig_for(a) as ra, rig_for(b) as rb:
        for rig in (ra, rb):
            assert (await rig.post("/v1/agents/hello", hello()))[0] == 200
        await asyncio.gather(
            *(ra.post("/v1/events", refused_batch(k + 1, k * 10, 10)) for k in range(4)),
            *(rb.post("/v1/events", refused_batch(k + 1, k * 10, 10)) for k in range(2, 6)),
        )
        await wait_for(
            lambda: (
                ra.metric("forward_forwarded", out) == 40
                and rb.metric("forward_forwarded", out) == 40
            ),
            20,
            "both replicas forwarded",
        )
    msgs = await stream_messages(nats_server.url)
    ids = sorted(m.headers["Nats-Msg-Id"] for m in msgs if m.headers)
    assert ids == [f"01JTEST{i:019d}" for i in range(60)]
