"""The agent's metrics/health server, against real loopback clients (some of them hostile)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anyio
import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import tapio.metrics
import tapio.sinks.http  # the sinks' metric children appear once they exist
from tapio.agent.httpserver import RunningServer, serve
from tapio.agent.settings import MetricsServerSettings

State = dict[str, object]


def _ready_probe(state: State) -> tuple[bool, dict[str, str]]:
    if state.get("raise"):
        raise RuntimeError("probe exploded")
    reasons = state.get("reasons", {})
    assert isinstance(reasons, dict)
    return bool(state.get("ready")), reasons


@asynccontextmanager
async def server(state: State | None = None, **overrides: object) -> AsyncIterator[RunningServer]:
    st: State = state if state is not None else {"ready": True}
    fields: dict[str, object] = {"enabled": True, "port": 0, "keepalive_timeout_secs": 0.5}
    fields.update(overrides)
    settings = msgspec.convert(fields, MetricsServerSettings)
    with anyio.fail_after(30):
        async with serve(settings, lambda: _ready_probe(st)) as srv:
            assert srv is not None
            yield srv


async def get(url: str, within: float = 2.0) -> tuple[int, str, str]:
    with anyio.fail_after(within):
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.text()


def documented_families() -> dict[str, str]:
    """Every metric family defined in tapio.metrics: exposition name -> type."""
    out: dict[str, str] = {}
    for value in vars(tapio.metrics).values():
        if isinstance(value, MetricWrapperBase):
            for fam in value.describe():
                out[fam.name] = fam.type
    return out


async def test_metrics_lists_every_family_and_parses() -> None:
    families = documented_families()
    assert "tapio_sink_drops" in families and "tapio_sink_queue_depth" in families
    assert len(families) >= 17
    async with server() as srv:
        status, ctype, text = await get(srv.base_url + "/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE_LATEST
    parsed = {f.name: f.type for f in text_string_to_metric_families(text)}
    missing = {n: t for n, t in families.items() if parsed.get(n) != t}
    assert not missing  # every family defined in tapio.metrics, with its type
    for name, kind in families.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {exposed} " in text
        assert f"# TYPE {exposed} {kind}\n" in text


async def test_metrics_carry_samples_after_increments() -> None:
    tapio.metrics.SINK_DROPS.labels(sink="test-sink", reason="buffer_full").inc(3)
    async with server() as srv:
        _, _, text = await get(srv.base_url + "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    key = ("tapio_sink_drops_total", (("reason", "buffer_full"), ("sink", "test-sink")))
    assert samples[key] >= 3


async def test_healthz_and_readyz() -> None:
    state: State = {"ready": False, "reasons": {"observers": "network not attached"}}
    async with server(state) as srv:
        assert (await get(srv.base_url + "/healthz"))[0] == 200
        status, ctype, body = await get(srv.base_url + "/readyz")
        assert status == 503 and ctype.startswith("application/json")
        assert json.loads(body) == {
            "ready": False,
            "reasons": {"observers": "network not attached"},
        }
        state.update(ready=True, reasons={})
        status, _, body = await get(srv.base_url + "/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "reasons": {}}
        state["raise"] = True
        status, _, body = await get(srv.base_url + "/readyz")
        assert status == 503 and "probe failed" in json.loads(body)["reasons"]["readiness"]
        assert (await get(srv.base_url + "/healthz"))[0] == 200
        assert (await get(srv.base_url + "/nope"))[0] == 404
        with anyio.fail_after(2):
            async with aiohttp.ClientSession() as s, s.post(srv.base_url + "/metrics") as r:
                assert r.status == 405


async def test_disabled_binds_nothing() -> None:
    async with serve(MetricsServerSettings(), lambda: (True, {})) as srv:
        assert srv is None


def test_settings_defaults_and_validation() -> None:
    s = MetricsServerSettings()
    assert (s.enabled, s.port, s.bind_address) == (False, 9464, "127.0.0.1")
    assert msgspec.convert({"bind_address": "::1"}, MetricsServerSettings).bind_address == "::1"
    for bad in ({"bind_address": "localhost"}, {"port": 70000}, {"keepalive_timeout_secs": 0}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, MetricsServerSettings)


async def test_port_in_use_is_a_startup_error() -> None:
    async with server() as srv:
        with pytest.raises(OSError):
            async with serve(
                MetricsServerSettings(enabled=True, port=srv.port), lambda: (True, {})
            ):
                pass


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_ipv6_bind_address() -> None:
    async with server(bind_address="::1") as srv:
        assert srv.base_url.startswith("http://[::1]:")
        assert (await get(srv.base_url + "/healthz"))[0] == 200


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_idle_connections_do_not_block_metrics() -> None:
    # A long keep-alive so the idle connections really are still open while we ask.
    async with server(keepalive_timeout_secs=30) as srv:
        conns = [await _open(srv.port) for _ in range(50)]
        try:
            t0 = time.monotonic()
            status, _, text = await get(srv.base_url + "/metrics", within=2.0)
            assert status == 200 and "tapio_events_total" in text
            assert time.monotonic() - t0 < 1.0
            # ... and they are still open (nothing was closed to make room).
            assert all(not w.is_closing() for _, w in conns)
        finally:
            for _, w in conns:
                w.close()


async def test_half_sent_request_does_not_block_others_and_is_closed() -> None:
    async with server(keepalive_timeout_secs=0.5) as srv:
        reader, writer = await _open(srv.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Partial: ")
        await writer.drain()
        t0 = time.monotonic()
        for _ in range(3):
            assert (await get(srv.base_url + "/healthz", within=1.0))[0] == 200
        assert time.monotonic() - t0 < 1.0
        # The stalled connection is dropped by the server after keepalive_timeout_secs.
        with anyio.fail_after(5):
            assert await reader.read() == b""
        assert time.monotonic() - t0 < 4.0
        writer.close()


async def test_trickling_client_is_cut_off() -> None:
    async with server(keepalive_timeout_secs=0.5) as srv:
        reader, writer = await _open(srv.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        t0 = time.monotonic()
        closed = False
        with anyio.fail_after(6):
            while not closed:
                try:
                    writer.write(b"X-Slow: a\r\n")  # one header line every 100 ms, forever
                    await writer.drain()
                except ConnectionError:
                    closed = True
                    break
                with anyio.move_on_after(0.1):
                    closed = await reader.read(1) == b""
        assert closed and time.monotonic() - t0 < 5.0
        writer.close()


async def test_oversized_request_is_refused_and_server_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with server() as srv:
        reader, writer = await _open(srv.port)
        writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        with anyio.fail_after(3):
            head = await reader.read(64)
        assert head.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4"))
        writer.close()
        reader2, writer2 = await _open(srv.port)
        writer2.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 10_000 + b"\r\n\r\n"
        )
        await writer2.drain()
        with anyio.fail_after(3):
            head2 = await reader2.read(64)
        assert head2.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4"))
        writer2.close()
        assert (await get(srv.base_url + "/healthz"))[0] == 200
    # A hostile client cannot flood the logs with tracebacks.
    assert not [r for r in caplog.records if r.exc_info]
