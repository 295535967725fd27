"""``GET /v1/evidence``: the evidence window, filtered and paged (behind the agent token).

Query parameters (each list parameter may be repeated or comma-separated; values within one
parameter are OR-ed, parameters are AND-ed):

* ``since``, ``until`` — ``15m``/``2h``/``1d`` ago or RFC 3339 with an offset;
* ``type``, ``observer``, ``severity`` (lists), ``min_severity``;
* ``node``, ``namespace``, ``pod``, ``workload`` (lists; a workload is ``name`` or
  ``Kind/name``), ``container_id`` (full or a prefix of 6+), ``pod_uid``;
* ``limit`` — 1..1000 (default 100); ``cursor`` — the ``next_cursor`` of the previous page.

The answer lists the forwarded documents newest first (by timestamp, then id), at most
``limit`` and about ``MAX_RESPONSE_BYTES``; ``next_cursor`` is present while more match.
A parameter that is unknown, repeated where it cannot be, or not valid is a 400 with the wire
error envelope (``INVALID_FIELD``), never a partial answer.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec
from multidict import MultiMapping

from tapio import wire
from tapio.cli.mcp_tools import decode_cursor, encode_cursor
from tapio.cli.store import SEVERITIES, Filter, parse_time
from tapio.controller.evidence.window import EvidenceWindow

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
MAX_VALUES: Final = 64
MAX_VALUE_CHARS: Final = 256

_LISTS: Final = {
    "type": "types",
    "observer": "observers",
    "severity": "severities",
    "node": "nodes",
    "namespace": "namespaces",
    "pod": "pods",
    "workload": "workloads",
}
_SINGLE: Final = ("since", "until", "min_severity", "container_id", "pod_uid", "limit", "cursor")


class WindowInfo(msgspec.Struct, kw_only=True):
    events: int
    max_events: int
    max_age_seconds: float
    max_bytes: int


class EvidenceResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    wire_version: str
    evidence: list[msgspec.Raw]
    returned: int
    matched: int
    truncated: bool
    window: WindowInfo
    next_cursor: str | None = None


def _values(query: MultiMapping[str], key: str) -> list[str]:
    out = []
    for raw in query.getall(key, []):
        for part in raw.split(","):
            value = part.strip()
            if not value:
                raise wire.WireError.invalid_field(key, "empty value")
            if len(value) > MAX_VALUE_CHARS:
                raise wire.WireError.invalid_field(key, f"longer than {MAX_VALUE_CHARS} characters")
            out.append(value)
    if len(out) > MAX_VALUES:
        raise wire.WireError.invalid_field(key, f"more than {MAX_VALUES} values")
    return out


def _single(query: MultiMapping[str], key: str) -> str | None:
    values = query.getall(key, [])
    if not values:
        return None
    if len(values) > 1:
        raise wire.WireError.invalid_field(key, "given more than once")
    value = values[0].strip()
    if not value or len(value) > MAX_VALUE_CHARS:
        raise wire.WireError.invalid_field(key, "empty or too long")
    return value


def _time(query: MultiMapping[str], key: str, now_ns: int) -> int | None:
    text = _single(query, key)
    if text is None:
        return None
    try:
        return parse_time(text, now_ns)
    except ValueError as exc:
        raise wire.WireError.invalid_field(key, str(exc)) from None


def parse_query(
    query: MultiMapping[str], now_ns: int | None = None
) -> tuple[Filter, int, tuple[int, str] | None]:
    """The filter, the page size and the cursor key of a query; WireError (400) otherwise."""
    unknown = sorted(set(query) - set(_LISTS) - set(_SINGLE))
    if unknown:
        raise wire.WireError.invalid_field(unknown[0], "unknown query parameter")
    now = time.time_ns() if now_ns is None else now_ns
    lists: dict[str, Any] = {}
    for key, name in _LISTS.items():
        values = _values(query, key)
        if values:
            lists[name] = frozenset(v.lower() if key == "severity" else v for v in values)
    bad = sorted(lists.get("severities", frozenset()) - set(SEVERITIES))
    if bad:
        raise wire.WireError.invalid_field("severity", f"unknown severity {bad[0]!r}")
    min_severity = _single(query, "min_severity")
    if min_severity is not None and min_severity.lower() not in SEVERITIES:
        raise wire.WireError.invalid_field("min_severity", f"unknown severity {min_severity!r}")
    limit_text = _single(query, "limit")
    limit = DEFAULT_LIMIT
    if limit_text is not None:
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            raise wire.WireError.invalid_field("limit", f"expected an integer 1..{MAX_LIMIT}")
        limit = int(limit_text)
    cursor_text = _single(query, "cursor")
    after = None
    if cursor_text is not None:
        try:
            after = decode_cursor(cursor_text)
        except ValueError:
            raise wire.WireError.invalid_field("cursor", "not a next_cursor of this API") from None
    flt = Filter(
        since_ns=_time(query, "since", now),
        until_ns=_time(query, "until", now),
        min_severity=min_severity.lower() if min_severity is not None else None,
        container_id=_single(query, "container_id"),
        pod_uid=_single(query, "pod_uid"),
        **lists,
    )
    return flt, limit, after


def evidence_response(window: EvidenceWindow, query: MultiMapping[str]) -> EvidenceResponse:
    flt, limit, after = parse_query(query)
    page = window.query(flt, limit, after)
    docs: list[msgspec.Raw] = []
    size = 0
    for rec in page.records:
        doc = rec.document()  # encoded here, for what is returned, unless an output sealed it
        if docs and size + len(doc) > MAX_RESPONSE_BYTES:
            break
        docs.append(msgspec.Raw(doc))
        size += len(doc) + 1
    returned = len(docs)
    cursor = None
    if returned < page.matched and returned:
        last = page.records[returned - 1]
        cursor = encode_cursor((last.ts_ns, last.id))
    return EvidenceResponse(
        wire_version=wire.WIRE_VERSION,
        evidence=docs,
        returned=returned,
        matched=page.matched,
        truncated=returned < min(limit, page.matched),
        window=WindowInfo(
            events=len(window),
            max_events=window.max_events,
            max_age_seconds=window.max_age,
            max_bytes=window.max_bytes,
        ),
        next_cursor=cursor,
    )
