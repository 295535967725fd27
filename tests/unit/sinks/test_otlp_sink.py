"""OTLP sink against a receiver that decodes the request with the official proto classes."""

from __future__ import annotations

import gzip
import socket
import time

import msgspec
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

import tapio
from tapio.occurrence import (
    CONTAINER_OOM_KILL,
    NETWORK_CONNECTION_REFUSED,
    NODE_CPU_STALL,
    STORAGE_IO_ERROR,
    STORAGE_LATENCY_SPIKE,
    new_occurrence,
    parse_timestamp,
)
from tapio.sinks.otlp import OtlpResource, OtlpSettings, OtlpSink, any_value

from .conftest import Counts, Recorded, decode_otlp, occ, running, start_receiver

EXPECTED_SEVERITY = {
    "debug": (5, "DEBUG"),
    "info": (9, "INFO"),
    "warning": (13, "WARN"),
    "error": (17, "ERROR"),
    "critical": (21, "FATAL"),
}


def _value(v: AnyValue) -> object:
    """Decode an AnyValue back to Python, keeping its declared type visible."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return ("array", [_value(x) for x in v.array_value.values])
    if kind == "kvlist_value":
        return ("kvlist", {kv.key: _value(kv.value) for kv in v.kvlist_value.values})
    if kind is None:
        return (None, None)
    return (kind, getattr(v, kind))


async def test_full_mapping_decoded_by_official_proto_classes() -> None:
    severities = ["debug", "info", "warning", "error", "critical"]
    types = [
        NETWORK_CONNECTION_REFUSED,
        STORAGE_LATENCY_SPIKE,
        NODE_CPU_STALL,
        STORAGE_IO_ERROR,
        CONTAINER_OOM_KILL,
    ]
    data = {
        "dst_port": 8080,
        "latency_ratio": 2.5,
        "in_container": True,
        "comm": "curl",
        "sectors": [1, 2, 3],
        "cgroup": {"id": 42, "path": "/kubepods/x"},
        "big": 2**70,
    }
    sent = [
        new_occurrence(
            t,
            sev,  # type: ignore[arg-type]
            "failure",
            timestamp_ns=1_700_000_000_123_456_789 + i,
            code=f"CODE_{i}",
            message=f"message {i}",
            data=data,
        )
        for i, (t, sev) in enumerate(zip(types, severities, strict=True))
    ]
    resource = OtlpResource(host_name="node-a.example", k8s_node_name="node-a")
    async with start_receiver() as rx:
        # A host name (not an IP literal) and a trailing slash: both must work.
        endpoint = rx.url.replace("127.0.0.1", "localhost") + "/"
        sink = OtlpSink(
            OtlpSettings(endpoint=endpoint, batch_size=5, flush_interval_secs=30), resource
        )
        before = time.time_ns()
        async with running(sink) as send:
            send.send_nowait(sent)
            await rx.wait_for(1)
        after = time.time_ns()

    assert len(rx.requests) == 1
    rec = rx.requests[0]
    assert rec.method == "POST" and rec.path == "/v1/logs"
    assert rec.headers["Content-Type"] == "application/x-protobuf"
    assert rec.headers["Content-Encoding"] == "gzip"
    assert rec.body[:2] == b"\x1f\x8b"  # really gzip on the wire
    req = decode_otlp(rec.body)

    assert len(req.resource_logs) == 1
    rl = req.resource_logs[0]
    res_attrs = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
    assert res_attrs == {
        "service.name": ("string_value", "tapio"),
        "service.version": ("string_value", tapio.__version__),
        "host.name": ("string_value", "node-a.example"),
        "k8s.node.name": ("string_value", "node-a"),
    }
    assert len(rl.scope_logs) == 1
    assert rl.scope_logs[0].scope.name == "tapio"
    records = rl.scope_logs[0].log_records
    assert len(records) == 5

    for o, lr in zip(sent, records, strict=True):
        assert lr.time_unix_nano == parse_timestamp(o.timestamp)
        assert before <= lr.observed_time_unix_nano <= after
        number, text = EXPECTED_SEVERITY[o.severity]
        assert lr.severity_number == number
        assert lr.severity_text == text
        assert o.error is not None
        assert _value(lr.body) == ("string_value", o.error.message)
        attrs = {kv.key: _value(kv.value) for kv in lr.attributes}
        assert len(attrs) == len(lr.attributes)  # no duplicate keys
        assert attrs == {
            "log.record.uid": ("string_value", o.id),
            "event.name": ("string_value", o.type),
            "tapio.source": ("string_value", "tapio"),
            "tapio.outcome": ("string_value", "failure"),
            "error.type": ("string_value", o.error.code),
            "network.peer.port": ("int_value", 8080),
            "tapio.latency_ratio": ("double_value", 2.5),
            "tapio.in_container": ("bool_value", True),
            "process.executable.name": ("string_value", "curl"),
            "tapio.sectors": ("array", [("int_value", 1), ("int_value", 2), ("int_value", 3)]),
            "tapio.cgroup": (
                "kvlist",
                {"id": ("int_value", 42), "path": ("string_value", "/kubepods/x")},
            ),
            "tapio.big": ("string_value", str(2**70)),  # beyond int64: kept, as text
        }
        assert lr.event_name == o.type
    assert sorted(EXPECTED_SEVERITY) == sorted({o.severity for o in sent})


async def test_resource_without_node_name_and_occurrence_without_error() -> None:
    o = new_occurrence(NODE_CPU_STALL, "warning", "unknown", data={"psi_some_avg10": 31.5})
    async with start_receiver() as rx:
        sink = OtlpSink(
            OtlpSettings(endpoint=rx.url, batch_size=1),
            OtlpResource(host_name=socket.gethostname()),
        )
        async with running(sink) as send:
            send.send_nowait([o])
            await rx.wait_for(1)
    rl = decode_otlp(rx.requests[0].body).resource_logs[0]
    keys = {kv.key for kv in rl.resource.attributes}
    assert keys == {"service.name", "service.version", "host.name"}
    lr = rl.scope_logs[0].log_records[0]
    attrs = {kv.key for kv in lr.attributes}
    assert "error.type" not in attrs
    assert lr.body.string_value == NODE_CPU_STALL


async def test_headers_and_auth_header_sent_and_redacted() -> None:
    secret = "Bearer otlp-SECRET-value"
    async with start_receiver() as rx:
        settings = OtlpSettings(
            endpoint=rx.url,
            auth_header=secret,
            headers={"X-Scope-OrgID": "tenant-1-SECRET"},
            batch_size=1,
        )
        sink = OtlpSink(settings, OtlpResource(host_name="h"))
        async with running(sink) as send:
            send.send_nowait([occ(1)])
            await rx.wait_for(1)
    assert rx.requests[0].headers["Authorization"] == secret
    assert rx.requests[0].headers["X-Scope-OrgID"] == "tenant-1-SECRET"
    for text in (repr(settings), str(settings), repr(sink)):
        assert "SECRET" not in text


@pytest.mark.parametrize("bad", ["Bearer a\r\nX: y", "Bearer a\nb", "a\x00b", "  "])
def test_auth_header_with_control_chars_rejected(bad: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"auth_header": bad}, OtlpSettings)
    assert bad.strip() == "" or bad not in str(info.value)  # the value is not echoed


def test_header_injection_in_extra_headers_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"headers": {"X-A": "v\r\nInjected: 1"}}, OtlpSettings)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"headers": {"Bad Name": "v"}}, OtlpSettings)


def test_documented_toml_keys_and_defaults() -> None:
    s = msgspec.convert(
        {"endpoint": "http://collector:4318/", "batch_size": 50, "flush_interval_secs": 2},
        OtlpSettings,
    )
    assert s.export_url() == "http://collector:4318/v1/logs"
    assert (s.batch_size, s.flush_interval_secs) == (50, 2.0)
    d = OtlpSettings()
    assert d.endpoint == "http://localhost:4318"
    assert (d.auth_header, d.headers, d.batch_size, d.flush_interval_secs) == (None, {}, 100, 5.0)


async def test_partial_success_rejections_are_counted() -> None:
    answer = ExportLogsServiceResponse(
        partial_success=ExportLogsPartialSuccess(rejected_log_records=2, error_message="bad")
    ).SerializeToString()

    def responder(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/x-protobuf"}, answer

    counts = Counts("otlp")
    async with start_receiver(responder) as rx:
        sink = OtlpSink(OtlpSettings(endpoint=rx.url, batch_size=5), OtlpResource(host_name="h"))
        async with running(sink) as send:
            send.send_nowait([occ(i) for i in range(5)])
            await rx.wait_for(1)
    d = counts.delta()
    assert d["ok"] == 3 and d["rejected"] == 2 and d["retries"] == 0


async def test_large_batch_is_gzipped_and_complete() -> None:
    sent = [occ(i, blob="z" * 5000) for i in range(100)]
    async with start_receiver() as rx:
        sink = OtlpSink(
            OtlpSettings(endpoint=rx.url, batch_size=100, flush_interval_secs=30),
            OtlpResource(host_name="h"),
        )
        async with running(sink) as send:
            send.send_nowait(sent)
            await rx.wait_for(1)
    body = rx.requests[0].body
    assert len(gzip.decompress(body)) > 500_000 > len(body)
    records = decode_otlp(body).resource_logs[0].scope_logs[0].log_records
    ids = [
        next(kv.value.string_value for kv in r.attributes if kv.key == "log.record.uid")
        for r in records
    ]
    assert ids == [o.id for o in sent]


def test_any_value_types() -> None:
    assert any_value(True).WhichOneof("value") == "bool_value"
    assert any_value(7).int_value == 7
    assert any_value(-(2**63)).int_value == -(2**63)
    assert any_value(2**63).string_value == str(2**63)
    assert any_value(1.5).double_value == 1.5
    assert any_value(b"\x00").bytes_value == b"\x00"
    assert any_value(None).WhichOneof("value") is None
    deep: object = 1
    for _ in range(20):
        deep = [deep]
    assert any_value(deep).WhichOneof("value") == "array_value"  # bounded depth, no recursion error


def test_resource_detect_reads_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPIO_NODE_NAME", "worker-7")
    r = OtlpResource.detect()
    assert r.k8s_node_name == "worker-7"
    assert r.service_name == "tapio" and r.service_version == tapio.__version__
    # Inside a pod gethostname() is the pod's name: the node is the host.
    assert r.host_name == "worker-7"
    monkeypatch.delenv("TAPIO_NODE_NAME")
    r = OtlpResource.detect()
    assert r.host_name == socket.gethostname() and r.k8s_node_name is None
