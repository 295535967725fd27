"""``tapio mcp``: a read-only Model Context Protocol server over stdio.

Transport: newline-delimited JSON-RPC 2.0 on stdin/stdout (one message per line, UTF-8, every
response flushed); anything diagnostic goes to stderr. Implemented by hand so the node-side
install stays lean (no ``mcp`` SDK, no pydantic).

Lifecycle: ``initialize`` negotiates the protocol version (the client's if supported, else our
latest), ``notifications/initialized`` and every other notification are never answered, ``ping``
returns ``{}``. Tools: the reference's ``tapio_recent_anomalies``, ``tapio_node_health`` and
``tapio_watch_stream`` (same names, descriptions and argument schemas) plus
``tapio_container_anomalies``.

Errors follow the JSON-RPC 2.0 and MCP specifications: -32700 parse error, -32600 invalid
request, -32601 method not found, -32602 invalid params (malformed ``tools/call`` params and
unknown tools). Argument validation errors are tool execution errors (``isError: true``) from
protocol 2025-11-25 on, and -32602 protocol errors for older negotiated versions, as each
revision of the specification says. Failures while reading the evidence are tool execution
errors (``isError: true``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import msgspec

from tapio import __version__
from tapio.cli.store import (
    HOUR_NS,
    OBSERVERS,
    DataDirError,
    Filter,
    Record,
    Summary,
    iter_records,
    newest,
    select,
    system_clock,
)
from tapio.occurrence import Occurrence

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Protocol revisions reachable through ``initialize``, oldest to newest.
SUPPORTED_VERSIONS: tuple[str, ...] = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
#: From this revision on, tool input validation errors are tool execution errors (SEP-1303).
_ARGUMENT_ERRORS_IN_RESULT = frozenset({"2025-11-25"})

MAX_LINE_BYTES = 4 * 1024 * 1024

SERVER_NAME = "tapio"
INSTRUCTIONS = (
    "Read-only access to the kernel anomaly evidence (occurrences) that the Tapio agent recorded "
    "on this node. Timestamps are UTC; the observers are network, container, storage and node."
)

TOOLS: list[dict[str, Any]] = [
    {
        "name": "tapio_recent_anomalies",
        "description": "Get recent kernel anomalies from the last N minutes",
        "inputSchema": {
            "type": "object",
            "properties": {
                "minutes": {
                    "type": "number",
                    "description": "Time window in minutes",
                    "default": 5,
                },
                "observer": {
                    "type": "string",
                    "description": "Observer category to include",
                    "enum": ["network", "container", "storage", "node", "all"],
                    "default": "all",
                },
                "severity": {
                    "type": "string",
                    "description": "Severity to include",
                    "enum": ["warning", "error", "critical", "all"],
                    "default": "all",
                },
            },
        },
    },
    {
        "name": "tapio_node_health",
        "description": "Get current node health summary across all observers",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "tapio_watch_stream",
        "description": "Get the most recent anomalies (snapshot, not streaming)",
        "inputSchema": {
            "type": "object",
            "properties": {
                "observer": {
                    "type": "string",
                    "description": "Observer category to include (network, container, storage, "
                    "node); all when omitted",
                },
                "max_events": {
                    "type": "number",
                    "description": "Maximum number of anomalies to return",
                    "default": 50,
                },
            },
        },
    },
    {
        "name": "tapio_container_anomalies",
        "description": (
            "Get kernel anomalies attributed to a container or pod in the last N minutes, "
            "matched on the container_id and pod_uid facts of each anomaly"
        ),
        "inputSchema": {
            "type": "object",
            "properties": {
                "container_id": {
                    "type": "string",
                    "description": "Container id, full or a prefix of at least 6 characters "
                    "(e.g. the 12-character short id)",
                },
                "pod_uid": {
                    "type": "string",
                    "description": "Kubernetes pod UID (dashes or underscores)",
                },
                "minutes": {
                    "type": "number",
                    "description": "Time window in minutes",
                    "default": 60,
                },
            },
        },
    },
]
_TOOL_NAMES = frozenset(tool["name"] for tool in TOOLS)


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class ToolInputError(Exception):
    """Arguments that do not satisfy the tool's input schema."""


class ToolFailure(Exception):
    """The tool could not read the evidence."""


_encoder = msgspec.json.Encoder()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _minutes(args: dict[str, Any], default: float) -> int:
    """The ``minutes`` argument as a window in nanoseconds."""
    value = args.get("minutes", default)
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ToolInputError(f"minutes must be a positive number, got {json.dumps(value)}")
    return int(value * 60_000_000_000)


def _enum(args: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = args.get(key, "all")
    if not isinstance(value, str) or value not in choices:
        raise ToolInputError(f"{key} must be one of {', '.join(choices)}, got {json.dumps(value)}")
    return value


def _optional_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ToolInputError(f"{key} must be a non-empty string, got {json.dumps(value)}")
    return value.strip()


def _occurrences_json(records: list[Record]) -> str:
    occs: list[Occurrence] = [rec.occ for rec in records]
    return _encoder.encode(occs).decode()


def _norm_uid(value: str) -> str:
    return value.strip().lower().replace("_", "-")


def _container_matches(rec: Record, container_id: str | None, pod_uid: str | None) -> bool:
    data = rec.occ.data or {}
    if container_id is not None:
        cid = data.get("container_id")
        if not isinstance(cid, str) or not cid:
            return False
        want = container_id.lower()
        have = cid.lower()
        if have != want and not (len(want) >= 6 and have.startswith(want)):
            return False
    if pod_uid is not None:
        uid = data.get("pod_uid")
        if not isinstance(uid, str) or _norm_uid(uid) != _norm_uid(pod_uid):
            return False
    return True


class McpServer:
    """Protocol state plus the tools; ``handle_line`` is the whole transport-independent API."""

    def __init__(
        self,
        data_dir: str,
        *,
        clock: Callable[[], int] = system_clock,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.clock = clock
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.protocol_version = LATEST_VERSION
        self.initialized = False
        self._warned: set[str] = set()

    # -- evidence ------------------------------------------------------------------------

    def _warn(self, path: str, reason: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            self.log(f"warning: skipped {path}: {reason}")

    def _records(self) -> Iterator[Record]:
        return iter_records(self.data_dir, self._warn)

    # -- tools ---------------------------------------------------------------------------

    def tool_recent_anomalies(self, args: dict[str, Any]) -> str:
        window = _minutes(args, 5)
        observer = _enum(args, "observer", (*OBSERVERS, "all"))
        severity = _enum(args, "severity", ("warning", "error", "critical", "all"))
        flt = Filter(
            observers=None if observer == "all" else frozenset({observer}),
            severities=None if severity == "all" else frozenset({severity}),
            since_ns=self.clock() - window,
        )
        return _occurrences_json(newest(select(self._records(), flt), None))

    def tool_node_health(self, args: dict[str, Any]) -> str:
        summary = Summary()
        for rec in select(self._records(), Filter(since_ns=self.clock() - HOUR_NS)):
            summary.add(rec)
        body = {
            "status": summary.status,
            "total_anomalies_1h": summary.total,
            "total_critical_1h": summary.critical,
            "observers": [
                {"name": s.name, "anomalies": s.count, "critical": s.critical}
                for s in summary.ordered(include_fixed=False)
            ],
        }
        return json.dumps(body, indent=2, ensure_ascii=False)

    def tool_watch_stream(self, args: dict[str, Any]) -> str:
        observer = _optional_str(args, "observer")
        value = args.get("max_events", 50)
        if not _is_number(value) or not float(value).is_integer() or value < 0:
            raise ToolInputError(
                f"max_events must be a non-negative integer, got {json.dumps(value)}"
            )
        limit = int(value)
        flt = Filter(
            observers=None if observer in (None, "all") else frozenset({str(observer)}),
        )
        return _occurrences_json(newest(select(self._records(), flt), limit))

    def tool_container_anomalies(self, args: dict[str, Any]) -> str:
        container_id = _optional_str(args, "container_id")
        pod_uid = _optional_str(args, "pod_uid")
        if container_id is None and pod_uid is None:
            raise ToolInputError("container_id or pod_uid is required")
        window = _minutes(args, 60)
        since = self.clock() - window
        matched = (
            rec
            for rec in self._records()
            if rec.ts_ns >= since and _container_matches(rec, container_id, pod_uid)
        )
        return _occurrences_json(newest(matched, None))

    def call_tool(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        handlers: dict[str, Callable[[dict[str, Any]], str]] = {
            "tapio_recent_anomalies": self.tool_recent_anomalies,
            "tapio_node_health": self.tool_node_health,
            "tapio_watch_stream": self.tool_watch_stream,
            "tapio_container_anomalies": self.tool_container_anomalies,
        }
        handler = handlers.get(name)
        if handler is None:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        try:
            text = handler(args)
        except ToolInputError as exc:
            message = f"Invalid arguments for tool '{name}': {exc}"
            if self.protocol_version not in _ARGUMENT_ERRORS_IN_RESULT:
                raise RpcError(INVALID_PARAMS, message) from None
            return _error_result(message)
        except (DataDirError, OSError) as exc:
            return _error_result(f"Tool call failed for '{name}': {exc}")
        return {"content": [{"type": "text", "text": text}]}

    # -- methods -------------------------------------------------------------------------

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
        self.protocol_version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        return {
            "protocolVersion": self.protocol_version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": SERVER_NAME, "title": "Tapio", "version": __version__},
            "instructions": INSTRUCTIONS,
        }

    def _tools_call(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: name must be a string")
        args = params.get("arguments")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise RpcError(INVALID_PARAMS, "Invalid params: arguments must be an object")
        if name not in _TOOL_NAMES:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        return self.call_tool(name, args)

    def _tools_list(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("cursor") is not None:
            raise RpcError(INVALID_PARAMS, "Invalid params: unknown cursor")
        return {"tools": TOOLS}

    def dispatch(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "initialize":
            return self._initialize(params)
        if method == "ping":
            return {}
        if method == "tools/list":
            return self._tools_list(params)
        if method == "tools/call":
            return self._tools_call(params)
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")

    def notify(self, method: str, params: Any) -> None:
        if method == "notifications/initialized":
            self.initialized = True
        # Every other notification (cancelled, progress, roots changes...) needs no action:
        # requests are answered synchronously and in order.

    # -- JSON-RPC framing ----------------------------------------------------------------

    def handle_message(self, msg: Any) -> dict[str, Any] | None:
        """One decoded JSON-RPC message (not a batch) to its response, or ``None``."""
        if not isinstance(msg, dict):
            return _error(None, INVALID_REQUEST, "Invalid Request")
        method = msg.get("method")
        has_id = "id" in msg
        if not has_id:
            if isinstance(method, str):
                self.notify(method, msg.get("params"))
                return None
            if "result" in msg or "error" in msg:
                return None  # a stray response: we never send requests
            return _error(None, INVALID_REQUEST, "Invalid Request")
        req_id = msg["id"]
        valid_id = isinstance(req_id, str | int | float) and not isinstance(req_id, bool)
        if method is None and ("result" in msg or "error" in msg):
            return None  # a response to a request we never made
        if not valid_id:
            return _error(None, INVALID_REQUEST, "Invalid Request: id must be a string or number")
        if msg.get("jsonrpc") != "2.0":
            return _error(req_id, INVALID_REQUEST, 'Invalid Request: jsonrpc must be "2.0"')
        if not isinstance(method, str):
            return _error(req_id, INVALID_REQUEST, "Invalid Request: method must be a string")
        params = msg.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _error(req_id, INVALID_PARAMS, "Invalid params: params must be an object")
        try:
            result = self.dispatch(method, params)
        except RpcError as exc:
            return {"jsonrpc": "2.0", "id": req_id, "error": exc.to_dict()}
        except Exception as exc:
            self.log(f"error: {method} failed: {type(exc).__name__}: {exc}")
            return _error(req_id, INTERNAL_ERROR, "Internal error")
        return {"jsonrpc": "2.0", "id": req_id, "result": result}

    def handle_line(self, line: bytes) -> bytes | None:
        """One input line to one output line (without the newline), or ``None``."""
        if not line.strip():
            return None
        try:
            msg = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return _encode(_error(None, PARSE_ERROR, "Parse error"))
        if isinstance(msg, list):
            if not msg:
                return _encode(_error(None, INVALID_REQUEST, "Invalid Request: empty batch"))
            responses = [r for r in (self.handle_message(m) for m in msg) if r is not None]
            return _encode(responses) if responses else None
        response = self.handle_message(msg)
        return None if response is None else _encode(response)

    def serve(self, stdin: BinaryIO, stdout: BinaryIO) -> int:
        """Answer requests until end of input."""
        while True:
            line = stdin.readline(MAX_LINE_BYTES + 1)
            if not line:
                return 0
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while True:  # discard the rest of the oversized message
                    rest = stdin.readline(MAX_LINE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
                out: bytes | None = _encode(
                    _error(None, INVALID_REQUEST, "Invalid Request: message too large")
                )
            else:
                out = self.handle_line(line)
            if out is not None:
                stdout.write(out + b"\n")
                stdout.flush()


def _error(req_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}


def _error_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


def _encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def run(data_dir: str, *, clock: Callable[[], int] = system_clock) -> int:
    server = McpServer(data_dir, clock=clock)
    return server.serve(sys.stdin.buffer, sys.stdout.buffer)
