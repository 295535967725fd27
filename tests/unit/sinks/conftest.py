"""Real loopback receivers and helpers for the network sink tests."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiohttp import web
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from tapio.metrics import REGISTRY
from tapio.occurrence import NETWORK_CONNECTION_REFUSED, Occurrence, new_occurrence
from tapio.sinks.base import Batch, Sink
from tapio.sinks.http import HttpSink, HttpSinkSettings
from tapio.sinks.otlp import OtlpResource, OtlpSettings, OtlpSink


def sample(name: str, **labels: str) -> float:
    """Current value of one metric sample (0 when the child does not exist yet)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def drops(sink: str, reason: str) -> float:
    return sample("tapio_sink_drops_total", sink=sink, reason=reason)


def writes(sink: str, result: str) -> float:
    return sample("tapio_sink_writes_total", sink=sink, result=result)


class Counts:
    """Snapshot of a sink's counters, to assert on deltas (the registry is process-wide)."""

    REASONS = ("buffer_full", "retries_exhausted", "rejected", "tls_error", "shutdown")

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self.base = self._read()

    def _read(self) -> dict[str, float]:
        out = {r: drops(self.sink, r) for r in self.REASONS}
        out["ok"] = writes(self.sink, "ok")
        out["err"] = writes(self.sink, "err")
        out["retries"] = sample("tapio_sink_retries_total", sink=self.sink)
        return out

    def delta(self) -> dict[str, float]:
        now = self._read()
        return {k: now[k] - self.base[k] for k in now}


def occ(i: int = 0, **data: Any) -> Occurrence:
    return new_occurrence(
        NETWORK_CONNECTION_REFUSED,
        "error",
        "failure",
        code="CONNECTION_REFUSED",
        message=f"connection refused #{i}",
        data={"seq": i, "dst_port": 8080, **data},
    )


@dataclass
class Recorded:
    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Responder = Callable[[int, Recorded], tuple[int, dict[str, str], bytes]]


def ok_responder(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b"{}"


@dataclass
class Receiver:
    responder: Responder
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        rec = Recorded(time.monotonic(), request.method, request.path, dict(request.headers), body)
        self.requests.append(rec)
        status, headers, payload = self.responder(len(self.requests), rec)
        return web.Response(status=status, headers=headers, body=payload)

    async def wait_for(self, n: int, within: float = 5.0) -> None:
        with anyio.fail_after(within):
            while len(self.requests) < n:
                await anyio.sleep(0.01)


@asynccontextmanager
async def start_receiver(
    responder: Responder = ok_responder,
    *,
    ssl_context: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    url_host: str | None = None,
) -> AsyncIterator[Receiver]:
    """An aiohttp server on a free loopback port that records every request verbatim
    (``auto_decompress=False``: a gzip body arrives gzipped)."""
    rx = Receiver(responder)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", rx.handle)
    runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    rx.url = f"{scheme}://{url_host or host}:{port}"
    try:
        yield rx
    finally:
        await runner.cleanup()


@asynccontextmanager
async def stalled_receiver() -> AsyncIterator[str]:
    """Accepts TCP connections, reads and discards whatever arrives, never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, family=socket.AF_INET)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for w in writers:
            w.close()
        server.close()
        with anyio.move_on_after(2):
            await server.wait_closed()


@asynccontextmanager
async def running(
    sink: Sink, buffer: int = 64, within: float = 20.0
) -> AsyncIterator[MemoryObjectSendStream[Batch]]:
    """Run ``sink.run`` in a task; on exit close the stream; ``run`` must then return on its own
    (its final flush is bounded by the sink's settings). The whole block is bounded too."""
    send, recv = anyio.create_memory_object_stream[Batch](buffer)
    with anyio.fail_after(within):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run, recv)
            try:
                yield send
            finally:
                send.close()


async def send_all(send: MemoryObjectSendStream[Batch], batches: Sequence[Batch]) -> None:
    for b in batches:
        send.send_nowait(b)


def make_sink(kind: str, endpoint: str, **overrides: Any) -> HttpSink | OtlpSink:
    """An HTTP or OTLP sink with fast test defaults (overridable)."""
    fields: dict[str, Any] = {
        "endpoint": endpoint,
        "batch_size": 10,
        "flush_interval_secs": 0.05,
        "backoff_base_secs": 0.01,
        "backoff_max_secs": 0.05,
        "connect_timeout_secs": 2.0,
        "timeout_secs": 2.0,
        "shutdown_timeout_secs": 2.0,
    }
    fields.update(overrides)
    if kind == "http":
        return HttpSink(HttpSinkSettings(**fields))
    return OtlpSink(OtlpSettings(**fields), OtlpResource(host_name="node-a"))


def decode_otlp(body: bytes) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    req.ParseFromString(gzip.decompress(body))
    return req


def ids_of(kind: str, rec: Recorded) -> list[str]:
    """The occurrence ids carried by one recorded request, in order."""
    if kind == "http":
        return [o["id"] for o in json.loads(rec.body)]
    out: list[str] = []
    for rl in decode_otlp(rec.body).resource_logs:
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                attrs = {kv.key: kv.value for kv in lr.attributes}
                out.append(attrs["log.record.uid"].string_value)
    return out
