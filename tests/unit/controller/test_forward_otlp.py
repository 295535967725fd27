"""otlp+http:// forwarding into an in-test OTLP/HTTP receiver that decodes every request with
opentelemetry-proto: each occurrence once (the receiver keys on ``log.record.uid``, as a
de-duplicating backend would), attributes from the agent's own OTLP mapping, one resource per
node, retries while the receiver answers 503, a final 400 dropped and counted."""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from tapio.controller import Controller
from tapio.controller.forward import Forwarder, ForwardSettings, build_output
from tapio.controller.metrics import ControllerMetrics

from .ctl_harness import JSON, batch, capturing_logger, enc, event, hello, running
from .nats_harness import wait_for


class Receiver:
    def __init__(self) -> None:
        self.status = 200
        self.requests = 0
        self.records: dict[str, dict[str, Any]] = {}  # by log.record.uid
        self.deliveries = 0

    async def logs(self, request: web.Request) -> web.Response:
        self.requests += 1
        assert request.headers["Content-Type"] == "application/x-protobuf"
        assert request.headers["Content-Encoding"] == "gzip"
        if self.status != 200:
            return web.Response(status=self.status, headers={"Retry-After": "0"})
        req = ExportLogsServiceRequest()
        raw = await request.read()  # aiohttp already undid Content-Encoding: gzip
        req.ParseFromString(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        for rl in req.resource_logs:
            resource = {a.key: a.value.string_value for a in rl.resource.attributes}
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    attrs = {a.key: a.value for a in lr.attributes}
                    uid = attrs["log.record.uid"].string_value
                    self.deliveries += 1
                    self.records[uid] = {
                        "node": resource["k8s.node.name"],
                        "severity": lr.severity_number,
                        "body": lr.body.string_value,
                        "time": lr.time_unix_nano,
                        "attrs": attrs,
                    }
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post("/otel/v1/logs", self.logs)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


def refused(seq: int, first: int, n: int, node: str) -> dict[str, Any]:
    events = [
        event(
            facts={
                "occurrence_id": f"otlp-{i:04d}",
                "outcome": "failure",
                "error_code": "CONNECTION_REFUSED",
                "error_message": "connection refused",
                "dst_port": 30_000 + i,
                "pid": 500 + i,
            }
        )
        for i in range(first, first + n)
    ]
    return batch(sequence=seq, events=events, node_name=node, agent_id=f"agent-{node}")


async def test_otlp_forwarding_each_once_with_the_agents_mapping() -> None:
    rx = Receiver()
    log, _ = capturing_logger()
    metrics = ControllerMetrics()
    async with rx.serve() as hostport:
        output = build_output(f"otlp+http://{hostport}/otel", ForwardSettings())
        ctl = Controller(logger=log, metrics=metrics, forwarder=Forwarder([output], metrics, log))
        name = output.name
        fwd = metrics.forward_forwarded.labels(name)
        async with running(ctl) as url, aiohttp.ClientSession() as s:

            async def post(path: str, body: Any) -> int:
                async with s.post(url + path, data=enc(body), headers=JSON) as r:
                    return r.status

            for node in ("node-a", "node-b"):
                assert await post("/v1/agents/hello", hello(f"agent-{node}", node_name=node)) == 200
            assert await post("/v1/events", refused(1, 0, 20, "node-a")) == 200
            assert await post("/v1/events", refused(1, 20, 5, "node-b")) == 200
            await wait_for(lambda: fwd._value.get() == 25, 10, "25 forwarded")
            rx.status = 503  # receiver overloaded: the lane retries
            assert await post("/v1/events", refused(2, 25, 25, "node-a")) == 200
            await wait_for(lambda: rx.requests >= 3, 10, "retries against 503")
            assert fwd._value.get() == 25
            rx.status = 200
            await wait_for(lambda: fwd._value.get() == 50, 15, "50 forwarded")
            # an agent re-sending a batch: the receiver sees the same uids again, stores once
            assert await post("/v1/events", refused(3, 25, 5, "node-a")) == 200
            await wait_for(lambda: fwd._value.get() == 55, 10, "re-send")
            rx.status = 400  # a receiver that will never take it: dropped, counted
            assert await post("/v1/events", refused(4, 50, 3, "node-a")) == 200
            await wait_for(
                lambda: metrics.forward_dropped.labels(name, "rejected")._value.get() == 3,
                10,
                "rejected drop",
            )
    assert sorted(rx.records) == [f"otlp-{i:04d}" for i in range(50)]
    assert metrics.forward_retried.labels(name)._value.get() > 0
    r7 = rx.records["otlp-0007"]
    assert r7["node"] == "node-a" and rx.records["otlp-0021"]["node"] == "node-b"
    attrs = r7["attrs"]
    assert attrs["log.record.uid"].string_value == "otlp-0007"
    assert attrs["event.name"].string_value == "kernel.network.connection_refused"
    assert attrs["network.peer.port"].int_value == 30_007
    assert attrs["process.pid"].int_value == 507
    assert attrs["error.type"].string_value == "CONNECTION_REFUSED"
    assert attrs["tapio.outcome"].string_value == "failure"
    assert r7["body"] == "connection refused"
    assert r7["severity"] == 13  # warning -> SEVERITY_NUMBER_WARN
    assert r7["time"] == 1_700_000_000_000_000_000
    assert msgspec.json.encode(sorted(attrs)).count(b"log.record.uid") == 1
