"""The MCP tools of ``tapio mcp``: their descriptions (schemas, annotations) and what they answer.

One implementation for both servers: ``tapio mcp`` on stdio reads a node's occurrence
directory, the controller's ``/mcp`` (streamable HTTP) reads its evidence window and adds the
namespace/workload/node arguments. Every tool only reads (``readOnlyHint``, idempotent, closed
world).
Results carry the JSON text that older clients read plus ``structuredContent`` matching the
tool's ``outputSchema``. Anomaly lists are bounded: at most ``MAX_ITEMS`` anomalies and about
``MAX_RESULT_BYTES`` of JSON per call; whatever is left is announced (``truncated``, a second
text block) and reachable with the returned ``next_cursor``, which pages from newest to oldest.
"""

from __future__ import annotations

import base64
import heapq
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from tapio.cli.store import (
    CLUSTER_KNOWN_TYPES,
    CLUSTER_OBSERVERS,
    HOUR_NS,
    KNOWN_TYPES,
    OBSERVERS,
    Filter,
    Record,
    Summary,
)

#: At most this many anomalies in one tool result.
MAX_ITEMS = 200
#: Stop adding anomalies once the JSON text reaches this size (one anomaly always fits).
MAX_RESULT_BYTES = 256 * 1024

_encoder = msgspec.json.Encoder()

_ANNOTATIONS = {"readOnlyHint": True, "idempotentHint": True, "openWorldHint": False}

_CURSOR = {
    "type": "string",
    "description": "next_cursor of a previous call with the same arguments: continue with the "
    "older anomalies",
}

#: ``structuredContent`` of the anomaly-list tools.
ANOMALY_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "anomalies": {
            "type": "array",
            "description": "occurrences, newest first, exactly as the agent recorded them",
            "items": {"type": "object"},
        },
        "returned": {"type": "integer", "minimum": 0},
        "matched": {
            "type": "integer",
            "minimum": 0,
            "description": "anomalies matching the arguments (after the cursor, if any)",
        },
        "truncated": {
            "type": "boolean",
            "description": "true when the response bound cut the list short (more remain)",
        },
        "next_cursor": {"type": "string", "description": "pass as cursor to get the rest"},
    },
    "required": ["anomalies", "returned", "matched", "truncated"],
}

HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "degraded", "critical"]},
        "total_anomalies_1h": {"type": "integer", "minimum": 0},
        "total_critical_1h": {"type": "integer", "minimum": 0},
        "observers": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "anomalies": {"type": "integer"},
                    "critical": {"type": "integer"},
                },
                "required": ["name", "anomalies", "critical"],
            },
        },
    },
    "required": ["status", "total_anomalies_1h", "total_critical_1h", "observers"],
}


def _tool(
    name: str, title: str, description: str, properties: dict[str, Any], output: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "description": description,
        "inputSchema": {"type": "object", "properties": properties},
        "outputSchema": output,
        "annotations": {"title": title, **_ANNOTATIONS},
    }


#: The cluster view's extra arguments (the controller's ``/mcp``): names the controller's
#: Kubernetes enrichment added and the node that sent the evidence.
SCOPE_PROPERTIES: dict[str, Any] = {
    "namespace": {"type": "string", "description": "Only this Kubernetes namespace"},
    "workload": {
        "type": "string",
        "description": "Only this workload: name or Kind/name (e.g. Deployment/checkout)",
    },
    "node": {"type": "string", "description": "Only evidence sent by this node"},
}


def tool_list(
    observers: tuple[str, ...], types: tuple[str, ...], *, cluster: bool = False
) -> list[dict[str, Any]]:
    """The tool descriptions for a server whose evidence has these observers and types; the
    cluster view adds the namespace/workload/node arguments to every tool."""
    scope = SCOPE_PROPERTIES if cluster else {}
    where = "in the cluster" if cluster else "on this node"
    return [
        _tool(
            "tapio_recent_anomalies",
            "Recent kernel anomalies",
            "Get recent kernel anomalies from the last N minutes",
            {
                "minutes": {
                    "type": "number",
                    "description": "Time window in minutes",
                    "default": 5,
                },
                "observer": {
                    "type": "string",
                    "description": "Observer category to include",
                    "enum": [*observers, "all"],
                    "default": "all",
                },
                "severity": {
                    "type": "string",
                    "description": "Severity to include",
                    "enum": ["warning", "error", "critical", "all"],
                    "default": "all",
                },
                "type": {
                    "type": "string",
                    "description": "Anomaly type to include",
                    "enum": [*types, "all"],
                    "default": "all",
                },
                **scope,
                "cursor": _CURSOR,
            },
            ANOMALY_LIST_SCHEMA,
        ),
        _tool(
            "tapio_node_health",
            "Node health",
            f"Get current health summary {where} across all observers",
            dict(scope),
            HEALTH_SCHEMA,
        ),
        _tool(
            "tapio_watch_stream",
            "Latest anomalies",
            "Get the most recent anomalies (snapshot, not streaming)",
            {
                "observer": {
                    "type": "string",
                    "description": f"Observer category to include ({', '.join(observers)}); all "
                    "when omitted",
                    "enum": [*observers, "all"],
                },
                "max_events": {
                    "type": "number",
                    "description": f"Maximum number of anomalies to return (at most {MAX_ITEMS} "
                    "per call)",
                    "default": 50,
                },
                **scope,
                "cursor": _CURSOR,
            },
            ANOMALY_LIST_SCHEMA,
        ),
        _tool(
            "tapio_container_anomalies",
            "Anomalies of a container or pod",
            "Get kernel anomalies attributed to a container or pod in the last N minutes, "
            "matched on the container_id and pod_uid facts of each anomaly",
            {
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
                **scope,
                "cursor": _CURSOR,
            },
            ANOMALY_LIST_SCHEMA,
        ),
    ]


TOOLS: list[dict[str, Any]] = tool_list(OBSERVERS, KNOWN_TYPES)
CLUSTER_TOOLS: list[dict[str, Any]] = tool_list(
    CLUSTER_OBSERVERS, CLUSTER_KNOWN_TYPES, cluster=True
)
TOOL_NAMES = frozenset(tool["name"] for tool in TOOLS)


class ToolInputError(Exception):
    """Arguments that do not satisfy the tool's input schema."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool answers: the text for every client and the structured form."""

    text: str
    structured: dict[str, Any]
    note: str | None = None  # a second text block (the truncation fact)


# --------------------------------------------------------------------------------------------
# arguments


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _minutes(args: dict[str, Any], default: float) -> int:
    """The ``minutes`` argument as a window in nanoseconds."""
    value = args.get("minutes", default)
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ToolInputError(f"minutes must be a positive number, got {json.dumps(value)}")
    return int(value * 60_000_000_000)


def _enum(args: dict[str, Any], key: str, choices: tuple[str, ...], default: str = "all") -> str:
    value = args.get(key, default)
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


def encode_cursor(key: tuple[int, str]) -> str:
    raw = json.dumps([key[0], key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str]:
    """The (timestamp, name) position a cursor encodes; ValueError if it is not one of ours.
    The controller's ``GET /v1/evidence`` pages with the same cursors."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ts, name = json.loads(raw)
        if isinstance(ts, int) and not isinstance(ts, bool) and isinstance(name, str):
            return ts, name
    except (ValueError, TypeError):
        pass
    raise ValueError("not a cursor")


def _cursor(args: dict[str, Any]) -> tuple[int, str] | None:
    """The position after which to continue (an opaque string to the client)."""
    text = _optional_str(args, "cursor")
    if text is None:
        return None
    try:
        return decode_cursor(text)
    except ValueError:
        raise ToolInputError("cursor is not a next_cursor returned by this tool") from None


# --------------------------------------------------------------------------------------------
# bounded anomaly lists


def anomaly_page(
    records: Iterable[Record], limit: int | None, after: tuple[int, str] | None
) -> ToolResult:
    """Newest first from ``after`` on (exclusive), at most ``limit`` (``None``: as many as the
    bound allows: ``MAX_ITEMS`` and about ``MAX_RESULT_BYTES`` of JSON), holding only that many
    records while scanning."""
    matched = 0

    def counted() -> Iterator[Record]:
        nonlocal matched
        for rec in records:
            if after is None or rec.sort_key < after:
                matched += 1
                yield rec

    cap = MAX_ITEMS if limit is None else min(limit, MAX_ITEMS)
    top = heapq.nlargest(cap, counted(), key=lambda r: r.sort_key)
    parts: list[bytes] = []
    size = 2
    for rec in top:
        encoded = rec.doc if rec.doc is not None else _encoder.encode(rec.occ)
        if parts and size + len(encoded) + 1 > MAX_RESULT_BYTES:
            break
        parts.append(encoded)
        size += len(encoded) + 1
    returned = len(parts)
    wanted = matched if limit is None else min(limit, matched)
    text = b"[" + b",".join(parts) + b"]"
    structured: dict[str, Any] = {
        "anomalies": msgspec.json.decode(text),
        "returned": returned,
        "matched": matched,
        # cut by this server's bound (not by the caller's own limit): say so
        "truncated": returned < wanted,
    }
    note = None
    if returned < matched and returned:
        structured["next_cursor"] = encode_cursor(top[returned - 1].sort_key)
    if structured["truncated"]:
        note = (
            f"truncated: {returned} of {matched} matching anomalies returned (at most "
            f"{MAX_ITEMS} or {MAX_RESULT_BYTES // 1024} KiB per call); call again with "
            f'cursor="{structured["next_cursor"]}" for the older ones'
        )
    return ToolResult(text.decode(), structured, note)


# --------------------------------------------------------------------------------------------
# the tools


Records = Callable[[Filter], Iterator[Record]]
"""The evidence matching a filter (a node's directory or a controller's evidence window)."""


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool call reads: the evidence, "now", and which observers and types it knows."""

    records: Records
    now: int
    observers: tuple[str, ...] = OBSERVERS
    types: tuple[str, ...] = KNOWN_TYPES
    cluster: bool = False

    def scope(self, args: dict[str, Any], **fields: Any) -> Filter:
        """``fields`` plus the cluster view's namespace/workload/node arguments."""
        if self.cluster:
            for key, name in (("namespace", "namespaces"), ("workload", "workloads")):
                value = _optional_str(args, key)
                if value is not None:
                    fields[name] = frozenset({value})
            node = _optional_str(args, "node")
            if node is not None:
                fields["nodes"] = frozenset({node})
        return Filter(**fields)


def recent_anomalies(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    window = _minutes(args, 5)
    observer = _enum(args, "observer", (*ctx.observers, "all"))
    severity = _enum(args, "severity", ("warning", "error", "critical", "all"))
    type_ = _enum(args, "type", (*ctx.types, "all"))
    flt = ctx.scope(
        args,
        observers=None if observer == "all" else frozenset({observer}),
        severities=None if severity == "all" else frozenset({severity}),
        types=None if type_ == "all" else frozenset({type_}),
        since_ns=ctx.now - window,
    )
    return anomaly_page(ctx.records(flt), None, _cursor(args))


def node_health(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    summary = Summary()
    for rec in ctx.records(ctx.scope(args, since_ns=ctx.now - HOUR_NS)):
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
    return ToolResult(json.dumps(body, indent=2, ensure_ascii=False), body)


def watch_stream(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    observer = _optional_str(args, "observer")
    if observer is not None and observer != "all" and observer not in ctx.observers:
        raise ToolInputError(
            f"observer must be one of {', '.join(ctx.observers)}, got {json.dumps(observer)}"
        )
    value = args.get("max_events", 50)
    if not _is_number(value) or not float(value).is_integer() or value < 0:
        raise ToolInputError(f"max_events must be a non-negative integer, got {json.dumps(value)}")
    observers = None if observer in (None, "all") else frozenset({str(observer)})
    flt = ctx.scope(args, observers=observers)
    return anomaly_page(ctx.records(flt), int(value), _cursor(args))


def container_anomalies(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    container_id = _optional_str(args, "container_id")
    pod_uid = _optional_str(args, "pod_uid")
    if container_id is None and pod_uid is None:
        raise ToolInputError("container_id or pod_uid is required")
    flt = ctx.scope(
        args,
        since_ns=ctx.now - _minutes(args, 60),
        container_id=container_id,
        pod_uid=pod_uid,
    )
    return anomaly_page(ctx.records(flt), None, _cursor(args))


HANDLERS: dict[str, Callable[[ToolContext, dict[str, Any]], ToolResult]] = {
    "tapio_recent_anomalies": recent_anomalies,
    "tapio_node_health": node_health,
    "tapio_watch_stream": watch_stream,
    "tapio_container_anomalies": container_anomalies,
}
