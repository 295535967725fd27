"""The official MCP Python SDK as the client of the controller's ``/mcp`` (streamable HTTP)."""

from __future__ import annotations

from typing import Any

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def mcp_session_call(
    url: str, token: str | None, calls: list[tuple[str, dict[str, Any]]]
) -> tuple[Any, list[Any], Any]:
    """Initialize a session at ``url`` (the ``/mcp`` endpoint), list the tools and make
    ``calls``; returns (initialize result, call results, tools)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(20.0)) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        tools = await session.list_tools()
        results = [await session.call_tool(name, args) for name, args in calls]
        return init, results, tools
