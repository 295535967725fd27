"""MCP at the controller's ``/mcp`` over streamable HTTP: the official SDK's client calls the same
tools as ``tapio mcp``, with namespace/workload/node filters, read-only, behind the token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tapio.controller import Controller
from tapio.controller.auth import TokenFile

from .ctl_harness import capturing_logger, running
from .evidence_harness import auth, send_standard
from .mcp_client import mcp_session_call

TOKEN = "mcp-token-" + "m" * 24
ACCEPT = {"Accept": "application/json, text/event-stream"}


def _controller(tmp_path: Path) -> Controller:
    (tmp_path / "token").write_text(TOKEN + "\n")
    log, _ = capturing_logger()
    return Controller(logger=log, token=TokenFile(tmp_path / "token"))


def _ports(result: Any) -> list[int]:
    assert not result.is_error, result.content
    return [a["data"].get("dst_port", 0) for a in result.structured_content["anomalies"]]


async def test_sdk_client_calls_the_tools_with_cluster_filters(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        await send_standard(s, url, auth(TOKEN))
        init, results, tools = await mcp_session_call(
            url + "/mcp",
            TOKEN,
            [
                ("tapio_recent_anomalies", {"namespace": "payments", "minutes": 10**9}),
                ("tapio_recent_anomalies", {"node": "node-a", "minutes": 10**9}),
                ("tapio_watch_stream", {"workload": "Deployment/pay"}),
                ("tapio_node_health", {"namespace": "payments"}),
                ("tapio_recent_anomalies", {"type": "cluster.scheduler.queue_backlog"}),
                ("tapio_recent_anomalies", {"observer": "gpu"}),
            ],
        )
        assert init.server_info.name == "tapio" and "cluster" in (init.instructions or "")
        by_name = {t.name: t for t in tools.tools}
        assert set(by_name) == {
            "tapio_recent_anomalies",
            "tapio_node_health",
            "tapio_watch_stream",
            "tapio_container_anomalies",
        }
        for tool in by_name.values():
            assert {"namespace", "workload", "node"} <= set(tool.input_schema["properties"])
            assert tool.annotations.read_only_hint is True
        assert (
            "scheduler"
            in by_name["tapio_recent_anomalies"].input_schema["properties"]["observer"]["enum"]
        )
        payments, node_a, pay, health, scheduler, bad = results
        assert _ports(payments) == [1004, 1003, 1002]
        docs = payments.structured_content["anomalies"]
        assert {d["node_name"] for d in docs} == {"node-b", "node-c"}  # as forwarded
        assert docs[0]["data"]["pod_namespace"] == "payments"
        assert _ports(node_a) == [1001, 1000]
        assert _ports(pay) == [1004, 1002]
        assert health.structured_content["total_anomalies_1h"] == 3
        assert health.structured_content["status"] == "degraded"
        assert _ports(scheduler) == []
        assert bad.is_error and "observer must be one of" in bad.content[0].text


async def test_without_token_refused_and_transport_rules(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        for token in (None, "wrong"):
            with pytest.raises(BaseException):  # noqa: B017 - the SDK wraps it in a group
                await mcp_session_call(url + "/mcp", token, [])
        failures = ctl.metrics.auth_failures
        assert failures.labels("missing")._value.get() >= 1
        assert failures.labels("invalid")._value.get() >= 1
        assert ctl.mcp.sessions == {}
        h = {**auth(TOKEN), **ACCEPT}
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
        async with s.post(url + "/mcp", json=init, headers=auth(None)) as r:
            assert r.status == 401
        async with s.post(url + "/mcp", json=init, headers=h) as r:
            assert r.status == 200
            sid = r.headers["Mcp-Session-Id"]
            assert len(sid) >= 32 and (await r.json())["result"]["protocolVersion"] == "2025-06-18"
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with s.post(url + "/mcp", json=note, headers={**h, "Mcp-Session-Id": sid}) as r:
            assert r.status == 202 and await r.read() == b""
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        cases: list[tuple[dict[str, str], Any, int]] = [
            ({}, ping, 400),  # no session id
            ({"Mcp-Session-Id": "nope"}, ping, 404),
            ({"Mcp-Session-Id": sid, "MCP-Protocol-Version": "1999-01-01"}, ping, 400),
            ({"Mcp-Session-Id": sid, "Origin": "http://evil.example"}, ping, 403),
            ({"Mcp-Session-Id": sid, "Accept": "text/html"}, ping, 406),
            ({"Mcp-Session-Id": sid}, "{not json", 400),
        ]
        for extra, body, status in cases:
            data = body if isinstance(body, str) else json.dumps(body)
            hdrs = {**h, "Content-Type": "application/json", **extra}
            async with s.post(url + "/mcp", data=data, headers=hdrs) as r:
                assert r.status == status, (extra, await r.text())
                assert (await r.json())["jsonrpc"] == "2.0"
        async with s.post(url + "/mcp", json=ping, headers={**h, "Mcp-Session-Id": sid}) as r:
            assert r.status == 200 and (await r.json())["result"] == {}
        async with s.post(
            url + "/mcp",
            data=b"x" * (1024 * 1024 + 1),
            headers={**h, "Content-Type": "application/json", "Mcp-Session-Id": sid},
        ) as r:
            assert r.status == 413
        async with s.get(url + "/mcp", headers=h) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST, DELETE"
        async with s.delete(url + "/mcp", headers={**h, "Mcp-Session-Id": sid}) as r:
            assert r.status == 204
        async with s.post(url + "/mcp", json=ping, headers={**h, "Mcp-Session-Id": sid}) as r:
            assert r.status == 404


async def test_sessions_are_bounded(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    ctl.mcp.max_sessions = 3
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25"},
        }
        sids = []
        for _ in range(5):
            async with s.post(url + "/mcp", json=init, headers={**auth(TOKEN), **ACCEPT}) as r:
                sids.append(r.headers["Mcp-Session-Id"])
        assert list(ctl.mcp.sessions) == sids[2:]
