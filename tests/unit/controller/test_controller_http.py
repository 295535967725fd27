"""Controller over real TCP on 127.0.0.1: routes, envelopes, limits, registry semantics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from tapio.controller import Controller
from tapio.profile import PRODUCTION_DEFAULT_HASH

from .ctl_harness import JSON, batch, capturing_logger, enc, event, heartbeat, hello, running

LIMIT = 262_144
ETAG = f'"{PRODUCTION_DEFAULT_HASH}"'


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def post(
        self, path: str, body: bytes | Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else enc(body)
        async with self.session.post(
            self.url + path, data=data, headers=JSON if headers is None else headers
        ) as r:
            raw = await r.read()
            return r.status, msgspec.json.decode(raw) if raw else None, r.headers

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        async with self.session.get(self.url + path, headers=headers) as r:
            return r.status, await r.read(), r.headers

    async def status(self) -> dict[str, Any]:
        code, raw, _ = await self.get("/v1/status")
        assert code == 200
        result: dict[str, Any] = msgspec.json.decode(raw)
        return result


#: Agents never go stale in these tests unless a test waits for it: ``/v1/status`` lists stale
#: agents by the clock, so a short bound would change the status a test compares before and
#: after a rejected request whenever a loaded machine makes the requests slow.
NEVER_STALE = 3600.0
#: The tests of staleness itself wait this long past it.
SHORT_STALE = 1.0


@pytest.fixture
async def ctl() -> Controller:
    log, _ = capturing_logger()
    return Controller(logger=log, stale_after=NEVER_STALE, max_agents=3)


@pytest.fixture
async def client(ctl: Controller) -> AsyncIterator[Client]:
    async with (
        running(ctl) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s,
    ):
        yield Client(s, url)


@pytest.fixture
async def stale_client() -> AsyncIterator[Client]:
    log, _ = capturing_logger()
    ctl = Controller(logger=log, stale_after=SHORT_STALE, max_agents=3)
    async with (
        running(ctl) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s,
    ):
        yield Client(s, url)


def assert_error(
    result: tuple[int, Any, Any], status: int, code: str, message: str | None = None
) -> None:
    got_status, body, _ = result
    assert got_status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    if message is not None:
        assert body["error"]["message"] == message


async def test_hello_registers_and_answers_from_active_config(client: Client) -> None:
    code, body, _ = await client.post("/v1/agents/hello", hello())
    assert code == 200
    assert body == {
        "wire_version": "tapio-wire/v1",
        "accepted": True,
        "controller_id": "tapio-controller/default",
        "config_version": "1",
        "send_interval_ms": 1000,
        "max_batch_events": 256,
    }
    status = await client.status()
    assert [a["agent_id"] for a in status["agents"]] == ["agent-1"]
    agent = status["agents"][0]
    assert agent["last_heartbeat_age_seconds"] is None
    assert agent["reported_config_hash"] == "" and agent["reported_config_version"] == ""
    assert status["unconverged_agents"] == ["agent-1"]
    assert status["config"] == {"version": "1", "config_hash": PRODUCTION_DEFAULT_HASH}


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (
            hello(wire_version="tapio-wire/v2"),
            "UNSUPPORTED_VERSION",
            "unsupported wire version tapio-wire/v2",
        ),
        (hello(agent_id=""), "MISSING_FIELD", "agent_id is required"),
        (hello(agent_id="   "), "MISSING_FIELD", "agent_id is required"),
        (hello(node_name="\t"), "MISSING_FIELD", "node_name is required"),
        (hello(arch=""), "MISSING_FIELD", "arch is required"),
    ],
)
async def test_hello_rejections_leave_registry_unchanged(
    client: Client, body: Any, code: str, message: str
) -> None:
    before = await client.status()
    assert_error(await client.post("/v1/agents/hello", body), 400, code, message)
    assert await client.status() == before


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (b'{"wire_version":"tapio-wire/v1","agent_id":"a"', JSON),  # truncated
        (b"", JSON),
        (b"not json", JSON),
        (b'{"wire_version":"tapio-wire/v1","agent_id":1}', JSON),  # wrong type
        (enc({k: v for k, v in hello().items() if k != "arch"}), JSON),  # missing field
        (enc(hello()), {"Content-Type": "text/plain"}),
        (enc(hello()), {"Content-Type": "application/x-www-form-urlencoded"}),
        (enc(hello()), {}),
        (b"\xff\xfe\x00{", JSON),
    ],
)
async def test_malformed_bodies(client: Client, raw: bytes, headers: dict[str, str]) -> None:
    for path in ("/v1/agents/hello", "/v1/agents/heartbeat", "/v1/events"):
        before = await client.status()
        assert_error(await client.post(path, raw, headers), 400, "MALFORMED_JSON")
        assert await client.status() == before  # not even the rejection totals move


async def test_json_content_type_with_parameters_is_accepted(client: Client) -> None:
    code, _, _ = await client.post(
        "/v1/agents/hello", hello(), {"Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert code == 200


async def test_wrong_method_and_unknown_path_use_envelope(client: Client) -> None:
    async with client.session.delete(client.url + "/v1/status") as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, HEAD"
        assert r.headers["Content-Type"].startswith("application/json")
        body = msgspec.json.decode(await r.read())
        assert body["error"]["code"] == "METHOD_NOT_ALLOWED"
    code, raw, headers = await client.get("/v1/agents/hello")
    assert code == 405 and headers["Allow"] == "POST"
    assert msgspec.json.decode(raw)["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert_error(await client.post("/v1/status", hello()), 405, "METHOD_NOT_ALLOWED")
    for path in ("/", "/v1", "/v1/agents", "/v2/events", "/v1/events/", "/metrics/x"):
        code, raw, _ = await client.get(path)
        assert code == 404
        assert msgspec.json.decode(raw) == {
            "error": {"code": "UNKNOWN_ENDPOINT", "message": "unknown tapio-controller endpoint"}
        }
    assert_error(await client.post("/v1/nope", hello()), 404, "UNKNOWN_ENDPOINT")


async def test_config_params_etag_and_304(client: Client) -> None:
    for query, missing in [
        ("", "agent_id"),
        ("?agent_id=a", "node_name"),
        ("?node_name=n", "agent_id"),
        ("?agent_id=%20%20&node_name=n", "agent_id"),  # URL-decoded, then blank
        ("?agent_id=a&node_name=", "node_name"),
    ]:
        code, raw, _ = await client.get("/v1/agents/config" + query)
        assert code == 400
        assert msgspec.json.decode(raw)["error"] == {
            "code": "MISSING_FIELD",
            "message": f"{missing} is required",
        }
    code, raw, headers = await client.get("/v1/agents/config?agent_id=a%2Fb&node_name=node%20a")
    assert code == 200 and headers["ETag"] == ETAG
    body = msgspec.json.decode(raw)
    assert body["version"] == "1" and body["config_hash"] == PRODUCTION_DEFAULT_HASH
    assert body["batching"] == {"send_interval_ms": 1000, "max_batch_events": 256}
    assert body["config"]["network"]["rtt_spike_abs_us"] == 500000
    for inm in (ETAG, f"  {ETAG} ", f"W/{ETAG}", f'"other", {ETAG}', "*"):
        code, raw, headers = await client.get(
            "/v1/agents/config?agent_id=a&node_name=n", {"If-None-Match": inm}
        )
        assert (code, raw, headers["ETag"]) == (304, b"", ETAG)
    for inm in (PRODUCTION_DEFAULT_HASH, '"sha256:0"', ""):
        code, _, _ = await client.get(
            "/v1/agents/config?agent_id=a&node_name=n", {"If-None-Match": inm}
        )
        assert code == 200


async def test_heartbeat_from_unknown_agent_is_refused_without_state(client: Client) -> None:
    before = await client.status()
    code, body, _ = await client.post("/v1/agents/heartbeat", heartbeat("ghost"))
    assert code == 200
    assert body == {"wire_version": "tapio-wire/v1", "accepted": False, "next_config_version": "1"}
    assert await client.status() == before
    # after registering, the same heartbeat is accepted and reported
    await client.post("/v1/agents/hello", hello("ghost"))
    code, body, _ = await client.post("/v1/agents/heartbeat", heartbeat("ghost"))
    assert body["accepted"] is True
    agent = (await client.status())["agents"][0]
    assert agent["reported_config_hash"] == PRODUCTION_DEFAULT_HASH
    assert agent["reported_config_version"] == "1"
    assert agent["observers"]["node"] == "degraded"
    assert agent["reported_counters"]["events_total"] == 3
    assert agent["last_heartbeat_age_seconds"] == 0


async def test_heartbeat_validation_errors(client: Client) -> None:
    await client.post("/v1/agents/hello", hello())
    before = await client.status()
    assert_error(
        await client.post("/v1/agents/heartbeat", heartbeat(observers={})),
        400,
        "MISSING_FIELD",
        "observers is required",
    )
    assert_error(
        await client.post("/v1/agents/heartbeat", heartbeat(config_version=" ")),
        400,
        "MISSING_FIELD",
    )
    assert_error(
        await client.post("/v1/agents/heartbeat", heartbeat(wire_version="x")),
        400,
        "UNSUPPORTED_VERSION",
    )
    assert_error(
        await client.post("/v1/agents/heartbeat", heartbeat(uptime_seconds=-1)),
        400,
        "MALFORMED_JSON",
    )
    assert await client.status() == before


async def test_stale_and_unconverged_agents(stale_client: Client) -> None:
    client = stale_client
    for agent in ("a", "b", "c"):
        await client.post("/v1/agents/hello", hello(agent))
    await client.post("/v1/agents/heartbeat", heartbeat("a"))
    await client.post("/v1/agents/heartbeat", heartbeat("b", config_hash="sha256:old"))
    status = await client.status()
    assert status["unconverged_agents"] == ["b", "c"]
    assert status["stale_agents"] == []
    await asyncio.sleep(SHORT_STALE + 0.1)
    await client.post("/v1/agents/heartbeat", heartbeat("a"))
    status = await client.status()
    assert status["stale_agents"] == ["b", "c"]
    assert [a["reported_config_hash"] for a in status["agents"]] == [
        PRODUCTION_DEFAULT_HASH,
        "sha256:old",
        "",
    ]


async def test_capacity_refuses_live_agents_and_evicts_stale_ones(stale_client: Client) -> None:
    client = stale_client
    for agent in ("a", "b", "c"):
        assert (await client.post("/v1/agents/hello", hello(agent)))[0] == 200
    before = await client.status()
    assert_error(await client.post("/v1/agents/hello", hello("d")), 503, "CAPACITY_EXCEEDED")
    assert await client.status() == before
    assert (await client.post("/v1/agents/hello", hello("a")))[0] == 200  # re-hello always fits
    await asyncio.sleep(SHORT_STALE + 0.1)
    for agent in ("a", "c"):
        await client.post("/v1/agents/heartbeat", heartbeat(agent))
    assert (await client.post("/v1/agents/hello", hello("d")))[0] == 200
    assert [a["agent_id"] for a in (await client.status())["agents"]] == ["a", "c", "d"]


async def test_events_accept_and_sequence_tracking(client: Client) -> None:
    await client.post("/v1/agents/hello", hello())
    for seq, n in [(5, 2), (6, 1), (9, 3), (9, 1), (2, 1), (10, 1)]:
        code, body, _ = await client.post("/v1/events", batch(sequence=seq, n=n))
        assert code == 200
        assert body == {
            "wire_version": "tapio-wire/v1",
            "accepted": n,
            "rejected": 0,
            "next_config_version": "1",
        }
    status = await client.status()
    assert status["agents"][0]["sequence"] == {
        "last_seen": 10,
        "gaps_total": 2,
        "regressions_total": 2,
    }
    assert status["totals"] == {
        "accepted_events_total": 9,
        "rejected_events_total": 0,
        "batches_accepted_total": 6,
        "batches_rejected_total": 0,
    }
    # a hello resets sequence tracking
    await client.post("/v1/agents/hello", hello())
    await client.post("/v1/events", batch(sequence=1))
    assert (await client.status())["agents"][0]["sequence"] == {
        "last_seen": 1,
        "gaps_total": 0,
        "regressions_total": 0,
    }
    # events from an agent that never said hello are refused: no agent, no totals moved
    before = await client.status()
    code, body, _ = await client.post("/v1/events", batch("stranger", sequence=3))
    assert code == 409
    assert body == {
        "error": {
            "code": "UNKNOWN_AGENT",
            "message": "agent is not registered; POST /v1/agents/hello first",
        }
    }
    after = await client.status()
    assert [a["agent_id"] for a in after["agents"]] == ["agent-1"]
    assert after["totals"] == before["totals"]


def _without_rejections(status: dict[str, Any]) -> dict[str, Any]:
    totals = {k: v for k, v in status["totals"].items() if "rejected" not in k}
    return {**status, "totals": totals}


@pytest.mark.parametrize(
    ("body", "status_code", "code", "message"),
    [
        (batch(n=257), 400, "INVALID_FIELD", "events: batch exceeds max_batch_events"),
        (batch(n=0), 400, "MISSING_FIELD", "events is required"),
        (batch(agent_id=" "), 400, "MISSING_FIELD", "agent_id is required"),
        (batch(node_name=""), 400, "MISSING_FIELD", "node_name is required"),
        (batch(wire_version="tapio-wire/v9"), 400, "UNSUPPORTED_VERSION", None),
        (
            batch(events=[event(), event(type="app.crash")]),
            400,
            "INVALID_FIELD",
            "type: must be a kernel.* event",
        ),
        (
            batch(events=[event(facts={"a": {"b": {"reasoning": "x"}}})]),
            422,
            "REASONING_FIELD",
            "event facts contain reasoning field $.a.b.reasoning",
        ),
        (
            batch(events=[event(facts={"chain": [{"ok": 1}, {"causal_chain": []}]})]),
            422,
            "REASONING_FIELD",
            "event facts contain reasoning field $.chain[1].causal_chain",
        ),
        (
            batch(events=[event(facts=[[{"suggestedFix": 1}]])]),
            422,
            "REASONING_FIELD",
            "event facts contain reasoning field $[0][0].suggestedFix",
        ),
    ],
)
async def test_rejected_batches(
    client: Client, body: Any, status_code: int, code: str, message: str | None
) -> None:
    await client.post("/v1/agents/hello", hello())
    await client.post("/v1/events", batch(sequence=1))
    before = await client.status()
    assert_error(await client.post("/v1/events", body), status_code, code, message)
    after = await client.status()
    assert _without_rejections(after) == _without_rejections(before)  # no sequence/accept change
    assert (
        after["totals"]["batches_rejected_total"] == before["totals"]["batches_rejected_total"] + 1
    )
    assert after["totals"]["rejected_events_total"] == before["totals"][
        "rejected_events_total"
    ] + len(body["events"])


def _padded_batch(size: int) -> bytes:
    raw = enc(batch(sequence=1, events=[event(facts={"pad": "x" * (size - 600)})]))
    raw = raw + b" " * (size - len(raw))
    assert len(raw) == size
    return raw


async def test_body_limit_exact_and_plus_one(client: Client) -> None:
    await client.post("/v1/agents/hello", hello())
    code, body, _ = await client.post("/v1/events", _padded_batch(LIMIT))
    assert code == 200 and body["accepted"] == 1
    before = await client.status()
    result = await client.post("/v1/events", _padded_batch(LIMIT + 1))
    assert_error(result, 413, "PAYLOAD_TOO_LARGE")
    assert await client.status() == before
    for path in ("/v1/agents/hello", "/v1/agents/heartbeat"):
        assert_error(await client.post(path, b"{" + b" " * LIMIT + b"}"), 413, "PAYLOAD_TOO_LARGE")


async def test_chunked_body_without_length_is_limited(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 65_536

    async with client.session.post(client.url + "/v1/events", data=chunks(), headers=JSON) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_metrics_and_healthz(client: Client) -> None:
    await client.post("/v1/agents/hello", hello())
    await client.post("/v1/events", batch(n=4))
    await client.post("/v1/events", batch(n=300))
    await client.post("/v1/agents/heartbeat", heartbeat("ghost"))
    code, raw, headers = await client.get("/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    assert "tapio_controller_events_accepted_total 4.0" in text
    assert "tapio_controller_events_rejected_total 300.0" in text
    assert 'tapio_controller_batches_total{result="rejected"} 1.0' in text
    assert 'tapio_controller_heartbeats_total{result="unknown_agent"} 1.0' in text
    assert "tapio_controller_agents 1.0" in text
    assert "tapio_controller_unconverged_agents 1.0" in text
    assert "tapio_controller_config_generation 1.0" in text
    assert 'tapio_controller_requests_total{route="/v1/events",status="400"} 1.0' in text
    code, raw, _ = await client.get("/healthz")
    assert (code, msgspec.json.decode(raw)) == (200, {"status": "ok"})
