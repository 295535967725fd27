"""``tapio mcp`` as current clients expect it: annotations and titles, ``outputSchema`` with
``structuredContent``, bounded lists with a continuation cursor, and per-revision features."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import mcp.types as mt
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from tapio.cli.mcp_server import McpServer
from tapio.cli.mcp_tools import MAX_ITEMS, MAX_RESULT_BYTES
from tapio.occurrence import format_timestamp

from .conftest import MIN, NOW, occ, write_occ

N_MANY = MAX_ITEMS + 57


def _many(d: Path, now: int, n: int = N_MANY, message: str = "m") -> list[str]:
    """``n`` occurrences within the last three minutes, ids ordered oldest to newest."""
    ids = []
    for i in range(n):
        o = occ(
            f"01HM{i:022d}",
            format_timestamp(now - 3 * MIN + i * 1_000_000),
            "kernel.network.connection_refused",
            "warning",
            message,
            {"container_id": "cd" * 32},
        )
        write_occ(d, o)
        ids.append(o.id)
    return ids


def _text(result: mt.CallToolResult, index: int = 0) -> str:
    block = result.content[index]
    assert isinstance(block, mt.TextContent)
    return block.text


async def test_official_client_sees_annotations_schemas_and_pages(
    tmp_path: Path, errlog: TextIO
) -> None:
    d = tmp_path / "occ"
    d.mkdir()
    all_ids = _many(d, time.time_ns())
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "tapio", "mcp", "--data-dir", str(d)]
    )
    async with (
        stdio_client(params, errlog=errlog) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = (await session.list_tools()).tools
        assert len(tools) == 4
        for tool in tools:
            assert tool.title
            assert tool.annotations is not None
            assert tool.annotations.read_only_hint is True
            assert tool.annotations.destructive_hint is not True
            assert tool.annotations.title == tool.title
            assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        health = await session.call_tool("tapio_node_health", {})
        assert health.structured_content == json.loads(_text(health))
        assert health.structured_content["status"] == "critical"  # 257 anomalies >= 20

        # the SDK validates structuredContent against outputSchema on every call below
        for tool, args in [
            ("tapio_recent_anomalies", {}),
            ("tapio_watch_stream", {"max_events": 10_000}),
            ("tapio_container_anomalies", {"container_id": "cdcdcdcdcdcd"}),
        ]:
            seen: list[str] = []
            cursor: str | None = None
            pages = 0
            while True:
                call_args = dict(args) if cursor is None else {**args, "cursor": cursor}
                result = await session.call_tool(tool, call_args)
                assert not result.is_error, _text(result)
                sc = result.structured_content
                assert sc is not None
                page = [o["id"] for o in json.loads(_text(result))]
                assert page == [o["id"] for o in sc["anomalies"]]
                assert sc["returned"] == len(page) <= MAX_ITEMS
                assert sc["matched"] == N_MANY - len(seen)
                seen += page
                pages += 1
                if not sc["truncated"]:
                    assert len(result.content) == 1 and "next_cursor" not in sc
                    break
                # the truncation is a fact in the text too, for clients without structure
                assert len(result.content) == 2
                note = _text(result, 1)
                assert note.startswith(f"truncated: {MAX_ITEMS} of {N_MANY} matching anomalies")
                assert sc["next_cursor"] in note
                cursor = sc["next_cursor"]
                assert pages < 5
            assert pages == 2, tool
            assert seen == all_ids[::-1], tool  # newest first, every one exactly once

        # a caller's own smaller limit is not truncation, yet the rest is still reachable
        small = await session.call_tool("tapio_watch_stream", {"max_events": 3})
        sc = small.structured_content
        assert sc is not None
        assert (sc["returned"], sc["matched"], sc["truncated"]) == (3, N_MANY, False)
        rest = await session.call_tool(
            "tapio_watch_stream", {"max_events": 3, "cursor": sc["next_cursor"]}
        )
        assert [o["id"] for o in json.loads(_text(rest))] == all_ids[::-1][3:6]


@pytest.fixture
def errlog(tmp_path: Path) -> Any:
    with open(tmp_path / "server-stderr.log", "w+") as f:
        yield f


# --------------------------------------------------------------------------------------------
# in-process (frozen clock)


def _server(d: Path, version: str = "2025-11-25") -> McpServer:
    s = McpServer(str(d), clock=lambda: NOW, log=lambda _text: None)
    rpc(
        s,
        {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": version}},
    )
    return s


def rpc(s: McpServer, msg: Any) -> Any:
    out = s.handle_line(json.dumps(msg).encode())
    return None if out is None else json.loads(out)


def call(s: McpServer, name: str, args: dict[str, Any]) -> dict[str, Any]:
    r = rpc(
        s,
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": name, "arguments": args},
        },
    )
    assert "result" in r, r
    result: dict[str, Any] = r["result"]
    return result


def test_byte_bound(tmp_path: Path) -> None:
    """Big occurrences: the JSON text stays within the byte budget, and paging gets them all."""
    big = "x" * (MAX_RESULT_BYTES // 5)
    ids = _many(tmp_path, NOW, n=12, message=big)
    s = _server(tmp_path)
    got: list[str] = []
    cursor = None
    for _ in range(12):
        args: dict[str, Any] = {"minutes": 10}
        if cursor is not None:
            args["cursor"] = cursor
        r = call(s, "tapio_recent_anomalies", args)
        text = r["content"][0]["text"]
        assert len(text.encode()) <= MAX_RESULT_BYTES
        sc = r["structuredContent"]
        assert 1 <= sc["returned"] < 12
        got += [o["id"] for o in json.loads(text)]
        if not sc["truncated"]:
            break
        cursor = sc["next_cursor"]
    assert got == ids[::-1]


def test_bad_cursor_and_unknown_names_are_argument_errors(tmp_path: Path) -> None:
    _many(tmp_path, NOW, n=3)
    s = _server(tmp_path)
    for name, args, why in [
        ("tapio_recent_anomalies", {"cursor": "bm9wZQ"}, "cursor is not a next_cursor"),
        ("tapio_watch_stream", {"cursor": "!!"}, "cursor is not a next_cursor"),
        ("tapio_watch_stream", {"cursor": 5}, "cursor must be a non-empty string"),
        ("tapio_watch_stream", {"observer": "gpu"}, "observer must be one of network"),
        ("tapio_recent_anomalies", {"type": "kernel.network.nope"}, "type must be one of"),
    ]:
        r = call(s, name, args)
        assert r["isError"] is True, (name, args)
        assert why in r["content"][0]["text"], r
    r = call(s, "tapio_recent_anomalies", {"type": "kernel.network.connection_refused"})
    assert r["structuredContent"]["returned"] == 3
    r = call(s, "tapio_recent_anomalies", {"type": "kernel.node.cpu_stall"})
    assert r["structuredContent"] == {
        "anomalies": [],
        "returned": 0,
        "matched": 0,
        "truncated": False,
    }


@pytest.mark.parametrize(
    ("version", "annotations", "structured"),
    [
        ("2024-11-05", False, False),
        ("2025-03-26", True, False),
        ("2025-06-18", True, True),
        ("2025-11-25", True, True),
    ],
)
def test_features_follow_the_negotiated_revision(
    tmp_path: Path, version: str, annotations: bool, structured: bool
) -> None:
    _many(tmp_path, NOW, n=2)
    s = _server(tmp_path, version)
    tools = rpc(s, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})["result"]["tools"]
    for tool in tools:
        assert ("annotations" in tool) is annotations
        assert ("title" in tool) is structured
        assert ("outputSchema" in tool) is structured
        if annotations:
            assert tool["annotations"]["readOnlyHint"] is True
        mt.Tool.model_validate(tool)
    r = call(s, "tapio_watch_stream", {})
    assert ("structuredContent" in r) is structured
    assert len(json.loads(r["content"][0]["text"])) == 2
