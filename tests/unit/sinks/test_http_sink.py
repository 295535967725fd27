"""HTTP sink: batching (count, bytes, time), TLS, bearer tokens, settings."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import anyio
import msgspec
import pytest
import structlog

from tapio.occurrence import decode
from tapio.sinks.http import HttpSink, HttpSinkSettings

from .conftest import Counts, Recorded, ids_of, make_sink, occ, running, start_receiver


async def test_batched_by_count_with_json_array_body() -> None:
    sent = [occ(i) for i in range(7)]
    async with start_receiver() as rx:
        sink = make_sink("http", rx.url, batch_size=3, flush_interval_secs=30)
        async with running(sink) as send:
            send.send_nowait(sent)
            await rx.wait_for(2, within=2)  # two full batches go at once, no timer involved
            await anyio.sleep(0.1)
            assert len(rx.requests) == 2
        # the remainder (1) goes with the final flush
    assert [len(ids_of("http", r)) for r in rx.requests] == [3, 3, 1]
    first = rx.requests[0]
    assert first.method == "POST"
    assert first.path == "/v1/occurrences"
    assert first.headers["Content-Type"] == "application/json"
    body = json.loads(first.body)
    assert isinstance(body, list)
    # Full occurrences, decodable by the schema, exactly what was sent.
    assert [decode(json.dumps(o)) for o in body] == sent[:3]
    assert [i for r in rx.requests for i in ids_of("http", r)] == [o.id for o in sent]


async def test_batched_by_bytes() -> None:
    sent = [occ(i, padding="x" * 200) for i in range(10)]
    async with start_receiver() as rx:
        sink = make_sink(
            "http", rx.url, batch_size=100, max_batch_bytes=1024, flush_interval_secs=30
        )
        async with running(sink) as send:
            send.send_nowait(sent)
            await rx.wait_for(3, within=2)  # the byte bound fires before count or time
    assert len(rx.requests) >= 4
    for r in rx.requests:
        assert len(r.body) <= 1024 + 1
    assert [i for r in rx.requests for i in ids_of("http", r)] == [o.id for o in sent]


async def test_oversized_occurrence_is_sent_alone() -> None:
    big = occ(1, padding="y" * 3000)
    async with start_receiver() as rx:
        sink = make_sink("http", rx.url, max_batch_bytes=1024)
        async with running(sink) as send:
            send.send_nowait([occ(0), big, occ(2)])
            await rx.wait_for(3)
    assert [ids_of("http", r) for r in rx.requests][1] == [big.id]


async def test_batched_by_time_without_more_events() -> None:
    async with start_receiver() as rx:
        sink = make_sink("http", rx.url, batch_size=100, flush_interval_secs=0.3)
        async with running(sink) as send:
            t0 = time.monotonic()
            send.send_nowait([occ(1), occ(2)])
            await rx.wait_for(1, within=2)
            waited = rx.requests[0].at - t0
            assert 0.25 <= waited < 1.0
            t1 = time.monotonic()
            send.send_nowait([occ(3)])
            await rx.wait_for(2, within=2)
            assert 0.25 <= rx.requests[1].at - t1 < 1.0
    assert [len(ids_of("http", r)) for r in rx.requests] == [2, 1]


def test_default_settings_and_path() -> None:
    s = HttpSinkSettings()
    assert s.endpoint == "http://localhost:8765"
    assert s.post_url() == "http://localhost:8765/v1/occurrences"
    assert (s.batch_size, s.max_batch_bytes, s.flush_interval_secs) == (100, 1 << 20, 1.0)
    assert (s.buffer_max_events, s.max_retries) == (10_000, 5)
    assert (s.backoff_base_secs, s.backoff_max_secs) == (0.5, 30.0)
    assert (s.connect_timeout_secs, s.timeout_secs) == (5.0, 10.0)
    assert s.ca_file is None and s.bearer_token_file is None and s.bearer_token_env is None
    assert HttpSinkSettings(endpoint="http://h:1/").post_url() == "http://h:1/v1/occurrences"
    assert HttpSinkSettings(endpoint="http://h:1/in").post_url() == "http://h:1/in"


@pytest.mark.parametrize(
    "fields",
    [
        {"endpoint": "ftp://x"},
        {"endpoint": "http://"},
        {"endpoint": ""},
        {"endpoint": "http://user:pw@host/"},
        {"batch_size": 0},
        {"batch_size": 200, "buffer_max_events": 100},
        {"max_retries": -1},
        {"backoff_base_secs": 5, "backoff_max_secs": 1},
        {"timeout_secs": 0},
        {"connect_timeout_secs": -1},
        {"bearer_token_file": "/a", "bearer_token_env": "B"},
    ],
)
def test_invalid_settings_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(fields, HttpSinkSettings)


def test_settings_decode_from_toml_shape() -> None:
    s = msgspec.convert({"endpoint": "https://c:9/x", "flush_interval_secs": 2}, HttpSinkSettings)
    assert s.flush_interval_secs == 2.0


@pytest.mark.parametrize("kind", ["http", "otlp"])
async def test_https_verified_with_configured_ca(
    kind: str, tls: tuple[ssl.SSLContext, str]
) -> None:
    server_ctx, ca_file = tls
    counts = Counts(kind)
    async with start_receiver(ssl_context=server_ctx, url_host="localhost") as rx:
        assert rx.url.startswith("https://localhost:")
        sink = make_sink(kind, rx.url, ca_file=ca_file, batch_size=2)
        async with running(sink) as send:
            send.send_nowait([occ(1), occ(2)])
            await rx.wait_for(1)
    assert len(ids_of(kind, rx.requests[0])) == 2
    assert counts.delta()["ok"] == 2


@pytest.mark.parametrize("kind", ["http", "otlp"])
async def test_https_fails_closed_without_the_ca(
    kind: str, tls: tuple[ssl.SSLContext, str]
) -> None:
    server_ctx, _ = tls
    counts = Counts(kind)
    async with start_receiver(ssl_context=server_ctx, url_host="localhost") as rx:
        sink = make_sink(kind, rx.url, batch_size=2)  # system store: does not know our CA
        async with running(sink) as send:
            send.send_nowait([occ(1), occ(2)])
            with anyio.fail_after(5):
                while counts.delta()["tls_error"] < 2:
                    await anyio.sleep(0.02)
    assert rx.requests == []  # nothing was ever sent in clear text or unverified
    d = counts.delta()
    assert d["tls_error"] == 2 and d["err"] == 2 and d["ok"] == 0


def test_unreadable_ca_file_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        HttpSink(HttpSinkSettings(endpoint="https://h/", ca_file=str(tmp_path / "missing.pem")))


TOKEN = "tok-3f9a1c-SECRET-never-log"


async def test_bearer_token_from_file_sent_and_never_logged(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    def responder(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (503, {}, b"") if n == 1 else (401, {}, b"") if n == 3 else (200, {}, b"")

    with structlog.testing.capture_logs() as logs:
        async with start_receiver(responder) as rx:
            sink = make_sink("http", rx.url, batch_size=1, bearer_token_file=str(token_file))
            async with running(sink) as send:
                send.send_nowait([occ(1)])
                await rx.wait_for(2)
                send.send_nowait([occ(2)])
                await rx.wait_for(3)
            text = repr(sink) + repr(sink.settings) + str(sink.settings)
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in rx.requests)
    assert logs, "the retry and the rejection must have been logged"
    assert any(e.get("reason") == "rejected" for e in logs)
    assert TOKEN not in repr(logs)
    assert TOKEN not in text


async def test_bearer_token_file_rotation_is_picked_up(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token")
    async with start_receiver() as rx:
        sink = make_sink("http", rx.url, batch_size=1, bearer_token_file=str(token_file))
        async with running(sink) as send:
            send.send_nowait([occ(1)])
            await rx.wait_for(1)
            token_file.write_text("second-token-longer")
            send.send_nowait([occ(2)])
            await rx.wait_for(2)
    assert [r.headers["Authorization"] for r in rx.requests] == [
        "Bearer first-token",
        "Bearer second-token-longer",
    ]


async def test_bearer_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPIO_HTTP_TOKEN", TOKEN)
    with structlog.testing.capture_logs() as logs:
        async with start_receiver(lambda n, r: (500, {}, b"")) as rx:
            sink = make_sink(
                "http", rx.url, batch_size=1, max_retries=1, bearer_token_env="TAPIO_HTTP_TOKEN"
            )
            async with running(sink) as send:
                send.send_nowait([occ(1)])
                await rx.wait_for(2)
    assert rx.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert logs and TOKEN not in repr(logs) and TOKEN not in repr(sink)


def test_missing_token_is_a_startup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAPIO_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ValueError, match="TAPIO_NO_SUCH_TOKEN"):
        HttpSink(HttpSinkSettings(bearer_token_env="TAPIO_NO_SUCH_TOKEN"))
    with pytest.raises(OSError):
        HttpSink(HttpSinkSettings(bearer_token_file=str(tmp_path / "nope")))
    bad = tmp_path / "bad"
    bad.write_text("abc\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="control characters"):
        HttpSink(HttpSinkSettings(bearer_token_file=str(bad)))
