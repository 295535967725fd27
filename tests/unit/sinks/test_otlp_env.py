"""The OTLP exporter honours the standard ``OTEL_*`` variables; TOML and flags win over them, the
logs-specific variables over the generic ones; bad values are clear errors without secrets."""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from tapio.agent.cli import build_parser, build_sinks
from tapio.agent.settings import parse_settings
from tapio.occurrence import NETWORK_CONNECTION_REFUSED, new_occurrence
from tapio.sinks.otlp import OtlpResource, OtlpSink
from tapio.sinks.otlp_config import parse_kv_list, resolve

from .conftest import running, start_receiver


def test_generic_endpoint_gets_the_logs_path_and_the_logs_endpoint_is_used_as_is() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert resolve({}, env).export_url() == "http://collector:4318/v1/logs"
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "https://gw.example/otlp"
    assert resolve({}, env).export_url() == "https://gw.example/otlp/v1/logs"
    env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] = "http://logs:9999/custom/path"
    assert resolve({}, env).export_url() == "http://logs:9999/custom/path"
    # The TOML endpoint names the collector: both variables are ignored.
    assert resolve({"endpoint": "http://toml:4318"}, env).export_url() == "http://toml:4318/v1/logs"
    assert resolve({}, {}).export_url() == "http://localhost:4318/v1/logs"


def test_every_variable_and_its_precedence() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "a=generic",
        "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "api-key=s%3Dcret%2C1 , x-tenant=team%20a",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/json",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "1500",
        "OTEL_SERVICE_NAME": "tapio-eu",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,team=a%2Cb,deployment.environment=prod",
    }
    s = resolve({}, env)
    assert s.headers == {"api-key": "s=cret,1", "x-tenant": "team a"}  # logs-specific, decoded
    assert (s.protocol, s.compression, s.timeout_secs) == ("http/json", "none", 1.5)
    assert s.service_name == "tapio-eu"  # OTEL_SERVICE_NAME beats service.name in the list
    assert s.resource_attributes["team"] == "a,b"
    # Without OTEL_SERVICE_NAME, service.name from OTEL_RESOURCE_ATTRIBUTES is used.
    assert resolve({}, {"OTEL_RESOURCE_ATTRIBUTES": "service.name=x"}).service_name == "x"
    # TOML wins, key by key.
    toml = {
        "headers": {"x-toml": "1"},
        "protocol": "http/protobuf",
        "compression": "gzip",
        "timeout_secs": 7.0,
        "service_name": "from-toml",
        "resource_attributes": {"k": "v"},
    }
    t = resolve(toml, env)
    assert t.headers == {"x-toml": "1"} and t.protocol == "http/protobuf"
    assert (t.compression, t.timeout_secs, t.service_name) == ("gzip", 7.0, "from-toml")
    assert t.resource_attributes == {"k": "v"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTLP over HTTP only"),
        ({"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "expected one of gzip, none"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "expected milliseconds"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "1..600000 ms"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization"}, "entry 1 is not key=value"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "=x"}, "OTEL_RESOURCE_ATTRIBUTES: entry 1"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c"}, "otlp"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises((ValueError, msgspec.ValidationError)) as exc:
        resolve({}, env)
    assert message in str(exc.value)


def test_header_secrets_never_in_errors_or_repr() -> None:
    secret = "Bearer SECRET-TOKEN-42"
    with pytest.raises(ValueError) as exc:
        parse_kv_list(f"ok=1,{secret}", what="OTEL_EXPORTER_OTLP_HEADERS", secret=True)
    assert "SECRET" not in str(exc.value) and "entry 2" in str(exc.value)
    bad = {"OTEL_EXPORTER_OTLP_HEADERS": "x-key=SECRET%0d%0aInjected: 1"}
    with pytest.raises((ValueError, msgspec.ValidationError)) as exc2:
        resolve({}, bad)
    assert "SECRET" not in str(exc2.value)
    s = resolve({}, {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=SECRET-TOKEN-42"})
    assert "SECRET" not in repr(s) and "SECRET" not in repr(
        OtlpSink(s, OtlpResource(host_name="n"))
    )


async def test_agent_wiring_exports_to_the_environment_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only ``OTEL_EXPORTER_OTLP_ENDPOINT`` (no ``[otlp]`` section): the agent's own sink
    construction exports there, and ``OTEL_RESOURCE_ATTRIBUTES`` lands on the resource."""
    occ = new_occurrence(NETWORK_CONNECTION_REFUSED, "warning", "failure", code="RST", data={})
    async with start_receiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.cluster.name=eu-1,team=net%20ops")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-scope-orgid=t1")
        monkeypatch.setenv("TAPIO_NODE_NAME", "node-7")
        args = build_parser().parse_args(["--sink", "otlp", "--data-dir", str(tmp_path)])
        (sink,) = build_sinks(["otlp"], args, parse_settings({"otlp": {"batch_size": 1}}))
        assert isinstance(sink, OtlpSink)
        async with running(sink) as send:
            send.send_nowait([occ])
            await rx.wait_for(1)
    rec = rx.requests[0]
    assert rec.path == "/v1/logs" and rec.headers["x-scope-orgid"] == "t1"
    req = ExportLogsServiceRequest()
    req.ParseFromString(gzip.decompress(rec.body))
    res = {kv.key: kv.value.string_value for kv in req.resource_logs[0].resource.attributes}
    assert res["k8s.cluster.name"] == "eu-1" and res["team"] == "net ops"
    assert res["host.name"] == "node-7" and res["k8s.node.name"] == "node-7"
    lr = req.resource_logs[0].scope_logs[0].log_records[0]
    assert {kv.key: kv.value.string_value for kv in lr.attributes}["log.record.uid"] == occ.id


def test_flag_and_toml_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://env:1/v1/logs")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    settings = parse_settings({"otlp": {"endpoint": "http://toml:4318"}})
    args = build_parser().parse_args(["--sink", "otlp"])
    (sink,) = build_sinks(["otlp"], args, settings)
    assert isinstance(sink, OtlpSink)
    assert sink.settings.export_url() == "http://toml:4318/v1/logs"
    assert sink.settings.protocol == "http/json"  # not set in TOML: the environment's
    args = build_parser().parse_args(["--sink", "otlp", "--otlp-endpoint", "http://flag:4318"])
    (sink,) = build_sinks(["otlp"], args, settings)
    assert isinstance(sink, OtlpSink)
    assert sink.settings.export_url() == "http://flag:4318/v1/logs"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="grpc"):
        build_sinks(["otlp"], args, settings)
