"""End to end: a real connection refusal, seen by the real BPF objects, reaches an HTTP receiver
(JSON) and an OTLP receiver (gzip protobuf decoded with the official classes), and the agent's
``/metrics`` reports the deliveries."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from ..ports import closed_port as held_closed_port
from ..ports import refuse
from ..unit.test_promtool import promtool
from .harness import agent, require_kernel, wait_until

pytestmark = pytest.mark.kernel

REFUSED = "kernel.network.connection_refused"


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def recorder() -> Iterator[_Recorder]:
    srv = _Recorder()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _http_refusals(rx: _Recorder, port: int) -> list[dict[str, Any]]:
    with rx.lock:
        reqs = list(rx.requests)
    out = []
    for path, headers, body in reqs:
        assert path == "/v1/occurrences"
        assert headers["Content-Type"] == "application/json"
        for occ in json.loads(body):
            if occ["type"] == REFUSED and occ.get("data", {}).get("dst_port") == port:
                out.append(occ)
    return out


def _otlp_refusals(rx: _Recorder, port: int) -> list[tuple[Any, dict[str, Any]]]:
    with rx.lock:
        reqs = list(rx.requests)
    out = []
    for path, headers, body in reqs:
        assert path == "/v1/logs"
        assert headers["Content-Encoding"] == "gzip"
        req = ExportLogsServiceRequest()
        req.ParseFromString(gzip.decompress(body))
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    attrs = {kv.key: kv.value for kv in lr.attributes}
                    if (
                        attrs["event.name"].string_value == REFUSED
                        and attrs.get("network.peer.port") is not None
                        and attrs["network.peer.port"].int_value == port
                    ):
                        out.append((rl, {"record": lr, **attrs}))
    return out


def test_connection_refusal_reaches_http_and_otlp_receivers(tmp_path: Path) -> None:
    require_kernel(("network",))
    metrics_port = 0  # the metrics server binds a free port itself and logs it
    closed_port = held_closed_port()
    with recorder() as http_rx, recorder() as otlp_rx:
        config = f"""
[metrics]
enabled = true
port = {metrics_port}
bind_address = "127.0.0.1"

[http]
flush_interval_secs = 0.2

[otlp]
endpoint = "{otlp_rx.url}/"
batch_size = 10
flush_interval_secs = 1
"""
        with agent(
            tmp_path,
            observers=("network",),
            sinks=("http", "otlp"),
            config=config,
            extra_args=("--http-endpoint", http_rx.url),
            env={"TAPIO_NODE_NAME": "e2e-node"},
        ) as proc:
            refuse(closed_port)
            http_hits = wait_until(lambda: _http_refusals(http_rx, closed_port), 15)
            otlp_hits = wait_until(lambda: _otlp_refusals(otlp_rx, closed_port), 15)
            assert http_hits, f"no refusal reached the HTTP receiver:\n{proc.stderr()[-3000:]}"
            assert otlp_hits, f"no refusal reached the OTLP receiver:\n{proc.stderr()[-3000:]}"
            metrics = proc.metrics_text(metrics_port)

    # One connect, one occurrence: the same evidence through both sinks.
    assert len(http_hits) == 1
    occ = http_hits[0]
    assert occ["severity"] == "warning" and occ["outcome"] == "failure"
    assert occ["data"]["dst_ip"] == "127.0.0.1"
    assert len(otlp_hits) == 1
    rl, attrs = otlp_hits[0]
    assert attrs["log.record.uid"].string_value == occ["id"]
    assert attrs["error.type"].string_value == occ["error"]["code"]
    assert attrs["network.peer.address"].string_value == "127.0.0.1"
    assert attrs["record"].severity_number == 13
    assert attrs["record"].severity_text == "WARN"
    res = {kv.key: kv.value.string_value for kv in rl.resource.attributes}
    assert res["service.name"] == "tapio"
    assert res["k8s.node.name"] == "e2e-node"

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics)
        for s in fam.samples
    }
    for sink in ("http", "otlp"):
        assert samples[("tapio_sink_writes_total", (("result", "ok"), ("sink", sink)))] >= 1
        duration = ("tapio_sink_request_duration_seconds_count", (("sink", sink),))
        assert samples[duration] >= 1
    # The real agent's exposition: lint-clean, with build, process and drain figures.
    promtool(metrics)
    assert samples[("tapio_drain_batch_size_count", (("observer", "network"),))] >= 1
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_open_fds", ())] > 0 and samples[("process_cpu_seconds_total", ())] > 0
    assert [k for k in samples if k[0] == "tapio_build_info"]


def test_otel_environment_alone_configures_the_exporter(tmp_path: Path) -> None:
    """No ``[otlp]`` section: ``OTEL_EXPORTER_OTLP_ENDPOINT`` names the collector (``/v1/logs``
    appended), ``OTEL_EXPORTER_OTLP_PROTOCOL=http/json`` and ``OTEL_RESOURCE_ATTRIBUTES`` apply,
    and the real agent's refusal arrives with the conventional attribute names."""
    from google.protobuf import json_format  # type: ignore[import-untyped]

    require_kernel(("network",))
    closed_port = held_closed_port()
    with recorder() as otlp_rx:
        env = {
            "TAPIO_NODE_NAME": "env-node",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_rx.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
            "OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=e2e,team=net%20ops",
            "OTEL_SERVICE_NAME": "tapio-e2e",
        }
        with agent(tmp_path, observers=("network",), sinks=("otlp",), config="", env=env) as proc:
            refuse(closed_port)

            def hits() -> list[tuple[dict[str, str], dict[str, Any]]]:
                with otlp_rx.lock:
                    reqs = list(otlp_rx.requests)
                out = []
                for path, headers, body in reqs:
                    assert path == "/v1/logs" and headers["Content-Type"] == "application/json"
                    req = json_format.Parse(body, ExportLogsServiceRequest())
                    for rl in req.resource_logs:
                        res = {kv.key: kv.value.string_value for kv in rl.resource.attributes}
                        for sl in rl.scope_logs:
                            for lr in sl.log_records:
                                attrs = {kv.key: kv.value for kv in lr.attributes}
                                port = attrs.get("network.peer.port")
                                if port is not None and port.int_value == closed_port:
                                    out.append((res, attrs))
                return out

            found = wait_until(hits, 15)
            assert found, f"no refusal reached the OTLP receiver:\n{proc.stderr()[-3000:]}"
    res, attrs = found[0]
    assert res["service.name"] == "tapio-e2e" and res["k8s.cluster.name"] == "e2e"
    assert res["team"] == "net ops" and res["k8s.node.name"] == "env-node"
    assert attrs["event.name"].string_value == REFUSED
    assert attrs["error.type"].string_value == "RST_RECEIVED"
    assert attrs["network.peer.address"].string_value == "127.0.0.1"
    assert attrs["process.pid"].int_value > 0 and attrs["process.executable.name"].string_value
    assert attrs["log.record.uid"].string_value
