"""``tapio mcp``: a read-only Model Context Protocol server over stdio.

Transport: newline-delimited JSON-RPC 2.0 on stdin/stdout (one message per line, UTF-8, every
response flushed); anything diagnostic goes to stderr. Implemented by hand so the node-side
install stays lean (no ``mcp`` SDK, no pydantic); the tools themselves live in ``mcp_tools``.

Lifecycle: ``initialize`` negotiates the protocol version (the client's if supported, else our
latest), ``notifications/initialized`` and every other notification are never answered, ``ping``
returns ``{}``. Tools: ``tapio_recent_anomalies``, ``tapio_node_health``, ``tapio_watch_stream``
and ``tapio_container_anomalies``, described as each negotiated revision knows them (annotations
from 2025-03-26, ``title`` and ``outputSchema``/``structuredContent`` from 2025-06-18).

Errors follow the JSON-RPC 2.0 and MCP specifications: -32700 parse error, -32600 invalid
request, -32601 method not found, -32602 invalid params (malformed ``tools/call`` params and
unknown tools). Argument validation errors are tool execution errors (``isError: true``) from
protocol 2025-11-25 on, and -32602 protocol errors for older negotiated versions, as each
revision of the specification says. Failures while reading the evidence are tool execution
errors (``isError: true``). JSON-RPC batches are answered only under the revisions that have
them (2024-11-05 and 2025-03-26); 2025-06-18 removed them, so from then on (and before any
version is negotiated) a batch gets one -32600 error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import msgspec

from tapio import __version__
from tapio.cli.mcp_tools import (
    CLUSTER_TOOLS,
    HANDLERS,
    TOOL_NAMES,
    TOOLS,
    Records,
    ToolContext,
    ToolInputError,
)
from tapio.cli.store import (
    CLUSTER_KNOWN_TYPES,
    CLUSTER_OBSERVERS,
    OBSERVERS,
    DataDirError,
    Filter,
    Record,
    iter_records,
    select,
    system_clock,
)

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
#: Revisions with JSON-RPC batches (2025-06-18 removed them).
BATCH_VERSIONS = frozenset({"2024-11-05", "2025-03-26"})
#: Revisions that know tool annotations, and tool titles with output schemas.
_ANNOTATION_VERSIONS = frozenset(SUPPORTED_VERSIONS[1:])
_STRUCTURED_VERSIONS = frozenset(SUPPORTED_VERSIONS[2:])

MAX_LINE_BYTES = 4 * 1024 * 1024

SERVER_NAME = "tapio"
INSTRUCTIONS = (
    "Read-only access to the kernel anomaly evidence (occurrences) that the Tapio agent recorded "
    f"on this node. Timestamps are UTC; the observers are {', '.join(OBSERVERS)}. Lists are "
    "bounded: when a result says truncated, pass its next_cursor back as cursor for the rest."
)
CLUSTER_INSTRUCTIONS = (
    "Read-only access to the recent kernel anomaly evidence (occurrences) that the Tapio agents "
    "of this cluster sent to the Tapio controller, enriched with Kubernetes names (pod_name, "
    "pod_namespace, workload_kind/workload_name), plus the controller's own scheduler evidence. "
    "Every tool takes namespace, workload and node filters. The controller keeps a bounded "
    "window (by count and age), not a history. Timestamps are UTC. Lists are bounded: when a "
    "result says truncated, pass its next_cursor back as cursor for the rest."
)


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


_encoder = msgspec.json.Encoder()


class McpServer:
    """Protocol state plus the tools; ``handle_line`` is the whole transport-independent API."""

    def __init__(
        self,
        data_dir: str | None = None,
        *,
        clock: Callable[[], int] = system_clock,
        log: Callable[[str], None] | None = None,
        records: Records | None = None,
    ) -> None:
        """Serve ``data_dir`` (a node's occurrence directory), or with ``records`` a
        controller's evidence window (the cluster tools: namespace/workload/node filters)."""
        if (data_dir is None) == (records is None):
            raise TypeError("McpServer takes a data_dir or records")
        self.data_dir = data_dir
        self.cluster = records is not None
        self._source: Records = records if records is not None else self._dir_records
        self.clock = clock
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.protocol_version = LATEST_VERSION
        self.initialized = False
        self._negotiated = False
        self._warned: set[str] = set()

    # -- evidence ------------------------------------------------------------------------

    def _warn(self, path: str, reason: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            self.log(f"warning: skipped {path}: {reason}")

    def _dir_records(self, flt: Filter) -> Iterator[Record]:
        assert self.data_dir is not None
        return select(iter_records(self.data_dir, self._warn), flt)

    def context(self) -> ToolContext:
        if self.cluster:
            return ToolContext(
                self._source, self.clock(), CLUSTER_OBSERVERS, CLUSTER_KNOWN_TYPES, cluster=True
            )
        return ToolContext(self._source, self.clock())

    # -- tools ---------------------------------------------------------------------------

    def tools(self) -> list[dict[str, Any]]:
        """The tool list as the negotiated revision describes tools."""
        drop: set[str] = set()
        if self.protocol_version not in _STRUCTURED_VERSIONS:
            drop |= {"title", "outputSchema"}
        if self.protocol_version not in _ANNOTATION_VERSIONS:
            drop.add("annotations")
        tools = CLUSTER_TOOLS if self.cluster else TOOLS
        return [{k: v for k, v in tool.items() if k not in drop} for tool in tools]

    def call_tool(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = HANDLERS.get(name)
        if handler is None:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        try:
            result = handler(self.context(), args)
        except ToolInputError as exc:
            message = f"Invalid arguments for tool '{name}': {exc}"
            if self.protocol_version not in _ARGUMENT_ERRORS_IN_RESULT:
                raise RpcError(INVALID_PARAMS, message) from None
            return _error_result(message)
        except (DataDirError, OSError) as exc:
            return _error_result(f"Tool call failed for '{name}': {exc}")
        content = [{"type": "text", "text": result.text}]
        if result.note is not None:
            content.append({"type": "text", "text": result.note})
        out: dict[str, Any] = {"content": content}
        if self.protocol_version in _STRUCTURED_VERSIONS:
            out["structuredContent"] = result.structured
        return out

    # -- methods -------------------------------------------------------------------------

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
        self.protocol_version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        self._negotiated = True
        return {
            "protocolVersion": self.protocol_version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": SERVER_NAME, "title": "Tapio", "version": __version__},
            "instructions": CLUSTER_INSTRUCTIONS if self.cluster else INSTRUCTIONS,
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
        if name not in TOOL_NAMES:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        return self.call_tool(name, args)

    def _tools_list(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("cursor") is not None:
            raise RpcError(INVALID_PARAMS, "Invalid params: unknown cursor")
        return {"tools": self.tools()}

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
            return self._handle_batch(msg)
        response = self.handle_message(msg)
        return None if response is None else _encode(response)

    def _handle_batch(self, batch: list[Any]) -> bytes | None:
        if not batch:
            return _encode(_error(None, INVALID_REQUEST, "Invalid Request: empty batch"))
        if not self._negotiated or self.protocol_version not in BATCH_VERSIONS:
            version = self.protocol_version if self._negotiated else "(none negotiated yet)"
            return _encode(
                _error(
                    None,
                    INVALID_REQUEST,
                    f"Invalid Request: JSON-RPC batches are not supported in protocol version "
                    f"{version} (only in {', '.join(sorted(BATCH_VERSIONS))})",
                )
            )
        responses = []
        for msg in batch:
            if isinstance(msg, dict) and msg.get("method") == "initialize":
                # the lifecycle forbids it: initialize must be a request of its own
                rid = msg.get("id")
                responses.append(
                    _error(
                        rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None,
                        INVALID_REQUEST,
                        "Invalid Request: initialize must not be part of a batch",
                    )
                )
                continue
            response = self.handle_message(msg)
            if response is not None:
                responses.append(response)
        return _encode(responses) if responses else None

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
