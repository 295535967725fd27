"""OTLP records use OpenTelemetry's semantic conventions, for every anomaly type, from the agent's
sink and from the controller's ``otlp+http`` output, as an in-test receiver decodes them with the
official opentelemetry-proto classes (protobuf and OTLP JSON, gzip and plain)."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tapio.controller.forward.otlp import OtlpOutput
from tapio.controller.forward.record import ForwardedError, ForwardedOccurrence, Record
from tapio.occurrence import ANOMALY_TYPES, Occurrence, new_occurrence
from tapio.sinks.otlp import OtlpResource, OtlpSettings, OtlpSink
from tapio.sinks.otlp_records import CONVENTIONS, WORKLOAD_KINDS

from .conftest import running

CONTAINER_ID = "a" * 64
POD_UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

#: Facts as the observers emit them (names from src/tapio/observers), by observer.
FACTS: dict[str, dict[str, Any]] = {
    "network": {
        "comm": "curl",
        "pid": 4242,
        "tid": 4243,
        "src_ip": "127.0.0.1",
        "src_port": 40000,
        "dst_ip": "127.0.0.1",
        "dst_port": 8080,
        "family": "ipv4",
        "protocol": "tcp",
        "pid_source": "connect",
        "config_generation": 1,
        "timestamp_ns": 123,
    },
    "container": {
        "comm": "app",
        "pid": 77,
        "tid": 77,
        "exit_code": 3,
        "signal": 0,
        "cgroup_id": 991,
        "memory_limit_bytes": 1 << 28,
        "config_generation": 1,
    },
    "storage": {
        "comm": "dd",
        "pid": 55,
        "tid": 55,
        "device": "loop0",
        "latency_ms": 120,
        "rwbs": "W",
        "config_generation": 1,
    },
    "node": {"resource": "cpu", "some_avg10": 31.5, "scope": "node", "config_generation": 1},
}
#: The agent's cgroup attribution (src/tapio/observers/cgroups/containers.py).
ATTRIBUTION = {"container_id": CONTAINER_ID, "container_runtime": "containerd", "pod_uid": POD_UID}
#: Attribute names a Tapio record may carry without the ``tapio.`` prefix.
CONVENTIONAL = (
    {"event.name", "log.record.uid", "error.type"}
    | set(CONVENTIONS.values())
    | set(WORKLOAD_KINDS.values())
)
EXPECTED = {
    "pid": "process.pid",
    "comm": "process.executable.name",
    "container_id": "container.id",
    "container_runtime": "container.runtime",
    "pod_uid": "k8s.pod.uid",
}


def _occurrences() -> list[Occurrence]:
    out = []
    for i, type_ in enumerate(ANOMALY_TYPES):
        observer = type_.split(".")[1]
        data = {**FACTS[observer], **(ATTRIBUTION if observer != "node" else {})}
        out.append(new_occurrence(type_, "warning", "failure", code=f"CODE_{i}", data=data))
    return out


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


@dataclass
class Receiver:
    """OTLP/HTTP logs receiver: decodes each request with the official classes."""

    url: str = ""
    requests: list[tuple[dict[str, str], ExportLogsServiceRequest]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.path == "/v1/logs", request.path
        raw = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            assert raw[:2] == b"\x1f\x8b"
            raw = gzip.decompress(raw)
        else:
            assert raw[:2] != b"\x1f\x8b"
        msg = ExportLogsServiceRequest()
        if request.headers["Content-Type"] == "application/json":
            json_format.Parse(raw, msg)
        else:
            assert request.headers["Content-Type"] == "application/x-protobuf"
            msg.ParseFromString(raw)
        self.requests.append((dict(request.headers), msg))
        return web.Response(status=200, content_type=request.headers["Content-Type"], body=b"")

    def records(self) -> list[tuple[dict[str, object], dict[str, object], Any]]:
        """(resource attributes, record attributes, record) of every record received."""
        out = []
        for _, msg in self.requests:
            for rl in msg.resource_logs:
                res = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
                for sl in rl.scope_logs:
                    for lr in sl.log_records:
                        attrs = {kv.key: _value(kv.value) for kv in lr.attributes}
                        assert len(attrs) == len(lr.attributes)  # no duplicate key
                        out.append((res, attrs, lr))
        return out

    async def wait_for(self, n: int, within: float = 10.0) -> None:
        with anyio.fail_after(within):
            while len(self.records()) < n:
                await anyio.sleep(0.02)


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rx.handle)
    runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rx.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rx
    finally:
        await runner.cleanup()


def _check_conventions(attrs: dict[str, object], occ: Occurrence) -> None:
    assert attrs["event.name"] == occ.type
    assert attrs["log.record.uid"] == occ.id
    assert occ.error is not None and attrs["error.type"] == occ.error.code
    for key in attrs:
        assert key in CONVENTIONAL or key.startswith(("tapio.", "k8s.pod.label.")), key
    for fact, value in (occ.data or {}).items():
        name = EXPECTED.get(fact) or CONVENTIONS.get(fact) or f"tapio.{fact}"
        assert attrs[name] == value, (occ.type, fact)


@pytest.mark.parametrize(
    ("protocol", "compression"),
    [
        ("http/protobuf", "gzip"),
        ("http/json", "gzip"),
        ("http/json", "none"),
        ("http/protobuf", "none"),
    ],
)
async def test_every_anomaly_type_uses_the_conventions(protocol: str, compression: str) -> None:
    sent = _occurrences()
    assert {o.type for o in sent} == set(ANOMALY_TYPES) and len(sent) >= 11
    async with receiver() as rx:
        settings = msgspec.convert(
            {
                "endpoint": rx.url,
                "protocol": protocol,
                "compression": compression,
                "batch_size": len(sent),
                "flush_interval_secs": 0.05,
            },
            OtlpSettings,
        )
        sink = OtlpSink(settings, OtlpResource(host_name="node-a", k8s_node_name="node-a"))
        async with running(sink) as send:
            send.send_nowait(sent)
            await rx.wait_for(len(sent))
    headers = rx.requests[0][0]
    assert ("Content-Encoding" in headers) == (compression == "gzip")
    got = {attrs["log.record.uid"]: (attrs, lr) for _, attrs, lr in rx.records()}
    for occ in sent:
        attrs, lr = got[occ.id]
        _check_conventions(attrs, occ)
        assert lr.event_name == occ.type
        if occ.observer != "node":
            assert attrs["process.pid"] == occ.data["pid"]  # type: ignore[index]
            assert attrs["container.id"] == CONTAINER_ID and attrs["k8s.pod.uid"] == POD_UID
            assert attrs["container.runtime"] == "containerd"
    refused = got[sent[0].id][0]
    assert refused["network.peer.address"] == "127.0.0.1"
    assert refused["network.peer.port"] == 8080 and refused["network.transport"] == "tcp"
    assert refused["network.type"] == "ipv4" and refused["tapio.pid_source"] == "connect"


def _record(occ: Occurrence, node: str, enrichment: dict[str, Any]) -> Record:
    assert occ.error is not None
    doc = ForwardedOccurrence(
        id=occ.id,
        timestamp=occ.timestamp,
        timestamp_unix_nanos=1,
        source="tapio",
        type=occ.type,
        severity=occ.severity,
        outcome=occ.outcome,
        observer=occ.observer,
        node_name=node,
        agent_id="agent-1",
        data={**(occ.data or {}), **enrichment},
        error=ForwardedError(code=occ.error.code, message=occ.error.message),
    )
    return Record(id=occ.id, type=occ.type, node_name=node, body=msgspec.json.encode(doc))


async def test_controller_output_names_enriched_pods_and_workloads() -> None:
    """The controller's forwarder shares the mapping; its Kubernetes enrichment (pod, namespace,
    container, workload of every kind, labels) gets the k8s.* names."""
    kinds = [*WORKLOAD_KINDS, "Rollout"]  # the last one has no convention: kept as tapio.*
    sent = _occurrences()
    records = []
    for i, occ in enumerate(sent):
        kind = kinds[i % len(kinds)]
        enrichment = {
            "pod_name": f"web-{i}",
            "pod_namespace": "shop",
            "node_name": "node-b",
            "container_name": "app",
            "workload_kind": kind,
            "workload_name": f"wl-{i}",
            "pod_labels": {"app.kubernetes.io/name": "web"},
        }
        records.append((occ, kind, _record(occ, "node-b", enrichment)))
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod,k8s.cluster.name=eu-1",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=team-a",
    }
    async with receiver() as rx:
        out = OtlpOutput("otlp+" + rx.url, env=env)
        await out.connect()
        try:
            assert await out.deliver([r for _, _, r in records]) == [True] * len(records)
        finally:
            await out.close()
    assert rx.requests[0][0]["Content-Type"] == "application/json"
    assert rx.requests[0][0]["x-tenant"] == "team-a"
    got = {attrs["log.record.uid"]: (res, attrs) for res, attrs, _ in rx.records()}
    assert len(got) == len(sent)
    for occ, kind, _ in records:
        res, attrs = got[occ.id]
        assert res["k8s.node.name"] == "node-b" and res["host.name"] == "node-b"
        assert res["k8s.cluster.name"] == "eu-1" and res["service.name"] == "tapio"
        assert res["deployment.environment.name"] == "prod"
        assert attrs["event.name"] == occ.type and attrs["error.type"] == occ.error.code  # type: ignore[union-attr]
        assert attrs["k8s.pod.name"].startswith("web-")  # type: ignore[union-attr]
        assert attrs["k8s.namespace.name"] == "shop" and attrs["k8s.container.name"] == "app"
        assert attrs["k8s.node.name"] == "node-b"
        assert attrs["k8s.pod.label.app.kubernetes.io/name"] == "web"
        if kind in WORKLOAD_KINDS:
            assert attrs[WORKLOAD_KINDS[kind]].startswith("wl-")  # type: ignore[union-attr]
            assert "tapio.workload_kind" not in attrs and "tapio.workload_name" not in attrs
        else:
            assert attrs["tapio.workload_kind"] == kind
        for key in attrs:
            assert key in CONVENTIONAL or key.startswith(("tapio.", "k8s.pod.label.")), key
