"""``tapio mcp``: the official MCP client over stdio, plus the raw JSON-RPC edges in-process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import mcp.types as mt
import pytest
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client import Client
from mcp.client._probe import negotiate_auto
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from tapio.cli.mcp_server import LATEST_VERSION, SUPPORTED_VERSIONS, TOOLS, McpServer
from tapio.occurrence import Occurrence, format_timestamp

from .conftest import MIN, NOW, occ, write_junk, write_occ

CID = "4f1c2b9a7d3e" + "0123456789abcdef" * 3 + "0123"  # 64 hex characters
POD = "8d2f6a1e-3b4c-4d5e-9f60-718293a4b5c6"


def live_set(now: int) -> list[Occurrence]:
    """Occurrences at fixed distances from ``now`` (minutes ago), ids ordered by age."""
    spec: list[tuple[int, str, str, dict[str, object] | None]] = [
        (1, "kernel.network.connection_refused", "warning", None),
        (3, "kernel.container.oom_kill", "critical", {"container_id": CID, "pod_uid": POD}),
        (10, "kernel.storage.io_error", "critical", None),
        (
            30,
            "kernel.container.abnormal_exit",
            "error",
            {"container_id": CID, "pod_uid": POD.replace("-", "_")},
        ),
        (45, "kernel.node.cpu_stall", "critical", None),
        (90, "kernel.network.connection_timeout", "error", {"container_id": "ab" * 32}),
        (3 * 24 * 60, "kernel.node.memory_pressure", "info", None),
    ]
    out = []
    for n, (minutes, type_, severity, data) in enumerate(spec, start=1):
        out.append(
            occ(
                f"01HM00000000000000000000{n:02d}",
                format_timestamp(now - minutes * MIN),
                type_,
                severity,
                f"message {n}",
                data,
            )
        )
    return out


def ids(text: str) -> list[str]:
    return [o["id"][-1] for o in json.loads(text)]


@pytest.fixture
def live_dir(tmp_path: Path) -> Path:
    d = tmp_path / "occ"
    d.mkdir()
    for o in live_set(time.time_ns()):
        write_occ(d, o)
    write_junk(d)
    return d


def server_params(d: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "tapio", "mcp", "--data-dir", str(d)],
    )


@pytest.fixture
def errlog(tmp_path: Path) -> Iterator[TextIO]:
    """The server's stderr (a real file: the SDK hands it to the subprocess)."""
    with open(tmp_path / "server-stderr.log", "w+") as f:
        yield f


def text_of(result: mt.CallToolResult) -> str:
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, mt.TextContent)
    return block.text


async def test_official_client_end_to_end(live_dir: Path, errlog: TextIO) -> None:
    async with (
        stdio_client(server_params(live_dir), errlog=errlog) as (read, write),
        ClientSession(read, write) as session,
    ):
        await _end_to_end(session, live_dir)
    errlog.seek(0)
    warnings = errlog.read().splitlines()
    assert len(warnings) == 8
    assert all(line.startswith(f"warning: skipped {live_dir}/") for line in warnings)


async def _end_to_end(session: ClientSession, live_dir: Path) -> None:
    init = await session.initialize()
    assert init.protocol_version == LATEST_VERSION == LATEST_HANDSHAKE_VERSION
    assert init.server_info.name == "tapio"
    assert init.capabilities.tools is not None
    await session.send_ping()

    listed = await session.list_tools()
    assert [t.name for t in listed.tools] == [
        "tapio_recent_anomalies",
        "tapio_node_health",
        "tapio_watch_stream",
        "tapio_container_anomalies",
    ]
    by_name = {t.name: t for t in listed.tools}
    recent = by_name["tapio_recent_anomalies"]
    assert recent.description == "Get recent kernel anomalies from the last N minutes"
    props = recent.input_schema["properties"]
    assert props["minutes"]["type"] == "number" and props["minutes"]["default"] == 5
    assert props["observer"]["enum"] == ["network", "container", "storage", "node", "all"]
    assert props["observer"]["default"] == "all"
    assert props["severity"]["enum"] == ["warning", "error", "critical", "all"]
    assert by_name["tapio_node_health"].input_schema == {"type": "object", "properties": {}}
    ws = by_name["tapio_watch_stream"]
    assert ws.description == "Get the most recent anomalies (snapshot, not streaming)"
    assert ws.input_schema["properties"]["max_events"]["default"] == 50
    assert ws.input_schema["properties"]["observer"]["type"] == "string"

    async def call(name: str, args: dict[str, Any] | None = None) -> str:
        result = await session.call_tool(name, args)
        assert not result.is_error, text_of(result)
        return text_of(result)

    # tapio_recent_anomalies: default 5 minutes, newest first, matches the files
    text = await call("tapio_recent_anomalies")
    assert ids(text) == ["1", "2"]
    for item in json.loads(text):
        on_disk = json.loads((live_dir / f"{item['id']}.json").read_bytes())
        assert item == on_disk
    assert ids(await call("tapio_recent_anomalies", {"minutes": 60})) == ["1", "2", "3", "4", "5"]
    assert ids(await call("tapio_recent_anomalies", {"minutes": 0.5 + 10})) == ["1", "2", "3"]
    assert ids(await call("tapio_recent_anomalies", {"minutes": 120, "observer": "network"})) == [
        "1",
        "6",
    ]
    assert ids(await call("tapio_recent_anomalies", {"minutes": 60, "severity": "critical"})) == [
        "2",
        "3",
        "5",
    ]
    assert ids(
        await call(
            "tapio_recent_anomalies",
            {"minutes": 10000, "observer": "node", "severity": "all"},
        )
    ) == ["5", "7"]

    # tapio_node_health: last hour
    health = json.loads(await call("tapio_node_health"))
    assert health == {
        "status": "critical",
        "total_anomalies_1h": 5,
        "total_critical_1h": 3,
        "observers": [
            {"name": "network", "anomalies": 1, "critical": 0},
            {"name": "container", "anomalies": 2, "critical": 1},
            {"name": "storage", "anomalies": 1, "critical": 1},
            {"name": "node", "anomalies": 1, "critical": 1},
        ],
    }

    # tapio_watch_stream: all time, newest first, truncated
    assert ids(await call("tapio_watch_stream")) == ["1", "2", "3", "4", "5", "6", "7"]
    assert ids(await call("tapio_watch_stream", {"max_events": 2})) == ["1", "2"]
    assert ids(await call("tapio_watch_stream", {"observer": "container"})) == ["2", "4"]
    assert ids(await call("tapio_watch_stream", {"observer": "node", "max_events": 1})) == ["5"]

    # tapio_container_anomalies: by container id (full or short), pod uid (either spelling)
    ca = "tapio_container_anomalies"
    assert ids(await call(ca, {"container_id": CID})) == ["2", "4"]
    assert ids(await call(ca, {"container_id": CID[:12]})) == ["2", "4"]
    assert ids(await call(ca, {"container_id": CID[:12], "minutes": 5})) == ["2"]
    assert ids(await call(ca, {"pod_uid": POD})) == ["2", "4"]
    assert ids(await call(ca, {"pod_uid": POD.replace("-", "_").upper()})) == ["2", "4"]
    assert ids(await call(ca, {"container_id": "ab" * 32, "minutes": 120})) == ["6"]
    assert ids(await call(ca, {"container_id": "ab" * 32})) == []
    assert ids(await call(ca, {"container_id": CID, "pod_uid": "other"})) == []

    # unknown tool: a JSON-RPC protocol error (-32602), as the MCP specification says
    with pytest.raises(MCPError) as err:
        await session.call_tool("tapio_nope", {})
    assert err.value.code == -32602
    assert "Unknown tool: tapio_nope" in err.value.message

    # bad arguments: tool execution errors (isError) at 2025-11-25
    for name, args in [
        ("tapio_recent_anomalies", {"minutes": "five"}),
        ("tapio_recent_anomalies", {"minutes": -1}),
        ("tapio_recent_anomalies", {"observer": "gpu"}),
        ("tapio_recent_anomalies", {"severity": "info"}),
        ("tapio_watch_stream", {"max_events": 2.5}),
        ("tapio_watch_stream", {"max_events": True}),
        ("tapio_container_anomalies", {}),
        ("tapio_container_anomalies", {"pod_uid": 7}),
    ]:
        result = await session.call_tool(name, args)
        assert result.is_error, (name, args)
        assert text_of(result).startswith(f"Invalid arguments for tool '{name}': ")


async def test_auto_mode_client_falls_back_to_initialize(live_dir: Path, errlog: TextIO) -> None:
    """The SDK's default ``Client`` probes ``server/discover`` first; we are a handshake-era
    server, so it must fall back to ``initialize`` and work."""
    async with (
        stdio_client(server_params(live_dir), errlog=errlog) as (read, write),
        ClientSession(read, write) as s,
    ):
        await negotiate_auto(s)
        assert s.protocol_version == LATEST_VERSION
        result = await s.call_tool("tapio_watch_stream", {"max_events": 1})
        assert ids(text_of(result)) == ["1"]
    async with Client(server_params(live_dir)) as client:
        assert client.protocol_version == LATEST_VERSION
        tools = await client.list_tools()
        assert len(tools.tools) == 4


# --------------------------------------------------------------------------------------------
# raw protocol (in-process, frozen clock)


def make_server(d: Path, now: int = NOW) -> tuple[McpServer, list[str]]:
    logs: list[str] = []
    return McpServer(str(d), clock=lambda: now, log=logs.append), logs


def rpc(server: McpServer, msg: Any) -> Any:
    raw = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    out = server.handle_line(raw)
    return None if out is None else json.loads(out)


def req(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    m: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        m["params"] = params
    return m


def test_version_negotiation(tmp_path: Path) -> None:
    for version in SUPPORTED_VERSIONS:
        s, _ = make_server(tmp_path)
        r = rpc(s, req("initialize", {"protocolVersion": version, "capabilities": {}}))
        assert r["result"]["protocolVersion"] == version
        assert r["result"]["capabilities"] == {"tools": {"listChanged": False}}
        assert r["result"]["serverInfo"]["name"] == "tapio"
    assert set(SUPPORTED_VERSIONS) >= {"2024-11-05", "2025-03-26", "2025-06-18"}
    assert LATEST_HANDSHAKE_VERSION in SUPPORTED_VERSIONS
    for unknown in ("2023-01-01", "2026-07-28", "bogus"):
        s, _ = make_server(tmp_path)
        r = rpc(s, req("initialize", {"protocolVersion": unknown, "capabilities": {}}))
        assert r["result"]["protocolVersion"] == LATEST_VERSION
    s, _ = make_server(tmp_path)
    r = rpc(s, req("initialize", {"capabilities": {}}))
    assert r["error"]["code"] == -32602


def test_jsonrpc_errors_and_notifications(tmp_path: Path) -> None:
    s, _ = make_server(tmp_path)
    assert rpc(s, b"{not json") == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error"},
    }
    assert rpc(s, b"\xff\xfe")["error"]["code"] == -32700
    assert rpc(s, b"   \n") is None
    # notifications (no id) are never answered, known or not, valid or not
    assert rpc(s, {"jsonrpc": "2.0", "method": "notifications/initialized"}) is None
    assert s.initialized
    assert rpc(s, {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": 3}) is None
    assert rpc(s, {"jsonrpc": "2.0", "method": "no/such/thing"}) is None
    assert rpc(s, {"method": "tools/list"}) is None
    # responses from the client (we never ask) are ignored
    assert rpc(s, {"jsonrpc": "2.0", "id": 9, "result": {}}) is None
    # invalid requests
    assert rpc(s, 42)["error"]["code"] == -32600
    assert rpc(s, {"jsonrpc": "2.0", "foo": 1})["error"]["code"] == -32600
    r = rpc(s, {"jsonrpc": "1.0", "id": 5, "method": "ping"})
    assert (r["id"], r["error"]["code"]) == (5, -32600)
    r = rpc(s, {"jsonrpc": "2.0", "id": None, "method": "ping"})
    assert (r["id"], r["error"]["code"]) == (None, -32600)
    r = rpc(s, {"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"})
    assert (r["id"], r["error"]["code"]) == (None, -32600)
    r = rpc(s, {"jsonrpc": "2.0", "id": 6, "method": 12})
    assert (r["id"], r["error"]["code"]) == (6, -32600)
    r = rpc(s, req("tools/list", params=[1, 2], id_=7))
    assert (r["id"], r["error"]["code"]) == (7, -32602)
    # method not found
    r = rpc(s, req("resources/list", id_="abc"))
    assert r == {
        "jsonrpc": "2.0",
        "id": "abc",
        "error": {"code": -32601, "message": "Method not found: resources/list"},
    }
    assert rpc(s, req("server/discover"))["error"]["code"] == -32601
    # ping
    assert rpc(s, req("ping", id_=0)) == {"jsonrpc": "2.0", "id": 0, "result": {}}
    # malformed tools/call params
    for params in ({}, {"name": 3}, {"name": "tapio_node_health", "arguments": [1]}):
        assert rpc(s, req("tools/call", params))["error"]["code"] == -32602
    r = rpc(s, req("tools/call", {"name": "nope"}))
    assert r["error"] == {"code": -32602, "message": "Unknown tool: nope"}
    assert rpc(s, req("tools/list", {"cursor": "x"}))["error"]["code"] == -32602


def test_batches(tmp_path: Path) -> None:
    """Batches exist in 2024-11-05 and 2025-03-26 only (2025-06-18 removed them)."""
    s, _ = make_server(tmp_path)
    assert rpc(s, [])["error"]["code"] == -32600
    rpc(s, req("initialize", {"protocolVersion": "2025-03-26", "capabilities": {}}))
    r = rpc(
        s,
        [
            req("ping", id_=1),
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            req("nope", id_=2),
            7,
            req("tools/list", id_=3),
        ],
    )
    assert [x["id"] for x in r] == [1, 2, None, 3]
    assert r[0]["result"] == {}
    assert r[1]["error"]["code"] == -32601
    assert r[2]["error"]["code"] == -32600
    assert len(r[3]["result"]["tools"]) == 4
    # a batch of notifications only gets no answer at all
    assert rpc(s, [{"jsonrpc": "2.0", "method": "notifications/initialized"}]) is None
    # initialize may not hide in a batch
    r = rpc(s, [req("initialize", {"protocolVersion": "2025-03-26"}, id_=8), req("ping", id_=9)])
    assert [(x["id"], x.get("error", {}).get("code")) for x in r] == [(8, -32600), (9, None)]


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25", None])
def test_batches_rejected_where_the_revision_has_none(tmp_path: Path, version: str | None) -> None:
    s, _ = make_server(tmp_path)
    if version is not None:
        rpc(s, req("initialize", {"protocolVersion": version, "capabilities": {}}))
    r = rpc(s, [req("ping", id_=1), req("tools/list", id_=2)])
    assert isinstance(r, dict), r  # one error, not a batch answer
    assert r["id"] is None and r["error"]["code"] == -32600
    assert "batches are not supported" in r["error"]["message"]
    assert str(version or "none negotiated") in r["error"]["message"]
    # the server keeps working after the rejection
    assert rpc(s, req("ping", id_=3)) == {"jsonrpc": "2.0", "id": 3, "result": {}}


def test_argument_errors_follow_the_negotiated_revision(tmp_path: Path) -> None:
    bad = req("tools/call", {"name": "tapio_recent_anomalies", "arguments": {"minutes": "x"}})
    for version, protocol_error in [
        ("2024-11-05", True),
        ("2025-03-26", True),
        ("2025-06-18", True),
        ("2025-11-25", False),
    ]:
        s, _ = make_server(tmp_path)
        rpc(s, req("initialize", {"protocolVersion": version, "capabilities": {}}))
        r = rpc(s, bad)
        if protocol_error:
            assert r["error"]["code"] == -32602
            assert "minutes must be a positive number" in r["error"]["message"]
        else:
            assert r["result"]["isError"] is True
            assert "minutes must be a positive number" in r["result"]["content"][0]["text"]


def test_tool_failure_is_a_tool_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    s, _ = make_server(f)
    r = rpc(s, req("tools/call", {"name": "tapio_watch_stream", "arguments": {}}))
    assert r["result"]["isError"] is True
    assert r["result"]["content"][0]["text"] == (
        f"Tool call failed for 'tapio_watch_stream': {f}: Not a directory"
    )


def test_frozen_clock_node_health_and_offsets(fixed_dir: Path) -> None:
    s, logs = make_server(fixed_dir)
    write_junk(fixed_dir)
    r = rpc(s, req("tools/call", {"name": "tapio_node_health"}))
    text = r["result"]["content"][0]["text"]
    assert text == json.dumps(
        {
            "status": "degraded",
            "total_anomalies_1h": 5,
            "total_critical_1h": 2,
            "observers": [
                {"name": "network", "anomalies": 2, "critical": 0},
                {"name": "storage", "anomalies": 1, "critical": 1},
                {"name": "node", "anomalies": 2, "critical": 1},
            ],
        },
        indent=2,
    )
    # each skipped file is logged once to stderr (never stdout), not on every call
    assert len(logs) == 8 and all(line.startswith("warning: skipped ") for line in logs)
    rpc(s, req("tools/call", {"name": "tapio_node_health"}))
    assert len(logs) == 8
    # 15 minutes across midnight with +01:00 and +05:30 stamps
    r = rpc(
        s,
        req("tools/call", {"name": "tapio_recent_anomalies", "arguments": {"minutes": 15}}),
    )
    assert ids(r["result"]["content"][0]["text"]) == ["1", "5", "2"]
    r = rpc(
        s,
        req(
            "tools/call",
            {
                "name": "tapio_container_anomalies",
                "arguments": {"pod_uid": "1234-ABCD", "minutes": 4 * 24 * 60},
            },
        ),
    )
    assert ids(r["result"]["content"][0]["text"]) == ["4", "6"]


def test_tools_schema_shape() -> None:
    for tool in TOOLS:
        assert set(tool) == {
            "name",
            "title",
            "description",
            "inputSchema",
            "outputSchema",
            "annotations",
        }
        assert tool["inputSchema"]["type"] == "object"
        assert tool["outputSchema"]["type"] == "object"
        assert tool["annotations"]["readOnlyHint"] is True
        assert tool["annotations"]["title"] == tool["title"]
        mt.Tool.model_validate(tool)


def test_stdio_framing_subprocess(fixed_dir: Path) -> None:
    """One response line per request, flushed, in order; EOF ends the server with 0."""
    lines = [
        json.dumps(req("initialize", {"protocolVersion": "2025-03-26", "capabilities": {}})),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        "",
        "garbage",
        json.dumps(req("tools/list", id_=2)),
        json.dumps([req("ping", id_=3), req("ping", id_=4)]),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "tapio", "mcp", "--data-dir", str(fixed_dir)],
        input=("\n".join(lines) + "\n").encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert out[0]["result"]["protocolVersion"] == "2025-03-26"
    assert out[1]["error"]["code"] == -32700
    assert out[2]["id"] == 2
    assert [x["id"] for x in out[3]] == [3, 4]
    assert len(out) == 4
    # the same batch under 2025-06-18 (no batches any more): one error line, then service
    lines[0] = json.dumps(req("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}}))
    lines.append(json.dumps(req("ping", id_=5)))
    proc = subprocess.run(
        [sys.executable, "-m", "tapio", "mcp", "--data-dir", str(fixed_dir)],
        input=("\n".join(lines) + "\n").encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert out[0]["result"]["protocolVersion"] == "2025-06-18"
    assert out[3]["error"]["code"] == -32600 and out[3]["id"] is None
    assert out[4] == {"jsonrpc": "2.0", "id": 5, "result": {}}
    assert len(out) == 5
