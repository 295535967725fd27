"""MCP over the streamable HTTP transport at ``/mcp``: the cluster view for assistants.

The protocol, the tools and their validation are the ones ``tapio mcp`` serves on stdio
(:class:`tapio.cli.mcp_server.McpServer`, one implementation); this module is only the HTTP
framing, on the controller's aiohttp app and behind the same bearer token as ``/v1/*`` (the auth
middleware runs first). The tools read the controller's evidence window and take namespace,
workload and node filters.

Framing (MCP revisions 2025-03-26 and later):

* ``POST /mcp`` carries one JSON-RPC message (or a batch, where the negotiated revision has
  them). A request is answered with ``application/json``; a body of only notifications or
  responses gets ``202 Accepted`` without a body. The server never sends requests of its own,
  so it never needs an SSE stream.
* ``initialize`` opens a session: the answer carries ``Mcp-Session-Id`` (random, 192 bits),
  which every later request must send; an unknown or expired id is 404 (the client starts a new
  session), a missing one 400. Sessions are bounded (``MAX_SESSIONS``, least recently used
  evicted) and expire after ``SESSION_IDLE_SECONDS`` without use.
* ``GET /mcp`` is 405: there are no server-initiated messages to stream. ``DELETE /mcp`` ends a
  session.
* An ``MCP-Protocol-Version`` header naming a revision this server does not speak is 400; an
  ``Origin`` header that does not name this host is 403 (DNS rebinding); a body over
  ``MAX_BODY_BYTES`` is 413. Transport errors are JSON-RPC error objects with ``id: null``.

Tool calls run on the event loop: they scan at most the window's bound and decode only what
matches.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from tapio.cli.mcp_server import INVALID_REQUEST, PARSE_ERROR, SUPPORTED_VERSIONS, McpServer
from tapio.cli.store import system_clock
from tapio.controller.evidence.window import EvidenceWindow

PATH: Final = "/mcp"
SESSION_HEADER: Final = "Mcp-Session-Id"
VERSION_HEADER: Final = "MCP-Protocol-Version"
MAX_SESSIONS: Final = 256
SESSION_IDLE_SECONDS: Final = 3600.0
MAX_BODY_BYTES: Final = 1024 * 1024


def _rpc_error(status: int, code: int, message: str) -> web.Response:
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type="application/json"
    )


def _accepts_json(header: str | None) -> bool:
    if header is None:
        return True
    for part in header.split(","):
        mime = part.split(";", 1)[0].strip().lower()
        if mime in ("application/json", "application/*", "*/*"):
            return True
    return False


def _origin_allowed(origin: str | None, host: str | None) -> bool:
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and host is not None and netloc.lower() == host.lower()


class McpEndpoint:
    """The sessions and the three handlers of ``/mcp``."""

    def __init__(
        self,
        window: EvidenceWindow,
        *,
        logger: Any = None,
        clock: Callable[[], float] = time.monotonic,
        now_ns: Callable[[], int] = system_clock,
        max_sessions: int = MAX_SESSIONS,
        idle_seconds: float = SESSION_IDLE_SECONDS,
    ) -> None:
        self.window, self.log = window, logger
        self.clock, self.now_ns = clock, now_ns
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self.sessions: OrderedDict[str, tuple[McpServer, float]] = OrderedDict()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.post)
        app.router.add_get(PATH, self.get)
        app.router.add_delete(PATH, self.delete)

    def _log(self, text: str) -> None:
        if self.log is not None:
            self.log.warning("mcp", detail=text)

    def _expire(self) -> None:
        cutoff = self.clock() - self.idle_seconds
        while self.sessions:
            sid, (_, used) = next(iter(self.sessions.items()))
            if used >= cutoff:
                break
            del self.sessions[sid]

    def _session(self, request: web.Request) -> tuple[str, McpServer] | web.Response:
        sid = request.headers.get(SESSION_HEADER)
        if sid is None:
            return _rpc_error(400, INVALID_REQUEST, "Bad Request: Mcp-Session-Id header required")
        self._expire()
        entry = self.sessions.get(sid)
        if entry is None:
            return _rpc_error(404, INVALID_REQUEST, "Session not found; initialize a new one")
        self.sessions[sid] = (entry[0], self.clock())
        self.sessions.move_to_end(sid)
        return sid, entry[0]

    def _new_session(self) -> tuple[str, McpServer]:
        self._expire()
        while len(self.sessions) >= self.max_sessions:
            self.sessions.popitem(last=False)
        sid = secrets.token_urlsafe(24)
        server = McpServer(records=self.window.records, clock=self.now_ns, log=self._log)
        self.sessions[sid] = (server, self.clock())
        return sid, server

    def _checks(self, request: web.Request) -> web.Response | None:
        if not _origin_allowed(request.headers.get("Origin"), request.host):
            return _rpc_error(403, INVALID_REQUEST, "Forbidden: Origin does not match the host")
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version not in SUPPORTED_VERSIONS:
            return _rpc_error(
                400, INVALID_REQUEST, f"Bad Request: unsupported {VERSION_HEADER} {version!r}"
            )
        return None

    async def post(self, request: web.Request) -> web.StreamResponse:
        refused = self._checks(request)
        if refused is not None:
            return refused
        mime = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if mime != "application/json":
            return _rpc_error(415, INVALID_REQUEST, "Content-Type must be application/json")
        if not _accepts_json(request.headers.get("Accept")):
            return _rpc_error(406, INVALID_REQUEST, "Accept must allow application/json")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _rpc_error(413, INVALID_REQUEST, f"body larger than {MAX_BODY_BYTES} bytes")
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            return _rpc_error(413, INVALID_REQUEST, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            msg = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return _rpc_error(400, PARSE_ERROR, "Parse error")
        headers: dict[str, str] = {}
        if isinstance(msg, dict) and msg.get("method") == "initialize":
            sid, server = self._new_session()
            headers[SESSION_HEADER] = sid
        else:
            found = self._session(request)
            if isinstance(found, web.Response):
                return found
            _, server = found
        out = server.handle_line(body)
        if out is None:
            return web.Response(status=202, headers=headers)
        return web.Response(body=out, content_type="application/json", headers=headers)

    async def get(self, request: web.Request) -> web.Response:
        refused = self._checks(request)
        if refused is not None:
            return refused
        return web.Response(
            status=405, headers={"Allow": "POST, DELETE"}, text="no server-initiated messages"
        )

    async def delete(self, request: web.Request) -> web.Response:
        refused = self._checks(request)
        if refused is not None:
            return refused
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        del self.sessions[found[0]]
        return web.Response(status=204)
