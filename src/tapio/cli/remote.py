"""The cluster view from the CLI: ``tapio recent|status|health --controller URL``.

The controller serves the recent enriched evidence it forwarded at ``GET /v1/evidence``
(token-protected, filtered, paged with an opaque cursor) and the agents it knows at
``GET /v1/status``. This module is the client: it pages through the evidence (bounded: at most
``MAX_PAGES`` pages of ``PAGE_LIMIT``, which covers the controller's whole window) and turns
each forwarded document into the same :class:`~tapio.cli.store.Record` a node's files give,
with ``node`` set, so the commands aggregate and render it with the node-side code.

Forwarded documents differ from occurrence files in a few fields (``observer``,
``node_name``, ``agent_id``, ``timestamp_unix_nanos``; no ``protocol_version``; a severity an
agent of a newer protocol may have called ``unknown``): :func:`record_from_doc` maps them, and
keeps the document itself for ``--json``.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from tapio.cli.store import SEVERITY_RANK, Forwarded, Record
from tapio.occurrence import PROTOCOL_VERSION, Occurrence, OccurrenceError

PAGE_LIMIT: Final = 1000
MAX_PAGES: Final = 200
MAX_RESPONSE_BYTES: Final = 32 * 1024 * 1024
TIMEOUT_SECONDS: Final = 30.0
_OUTCOMES: Final = frozenset({"success", "failure", "timeout", "in_progress", "unknown"})


class ForwardedDoc(msgspec.Struct, kw_only=True):
    """What the CLI needs of a forwarded occurrence (unknown fields ignored)."""

    id: str
    timestamp: str
    timestamp_unix_nanos: int
    source: str = "tapio"
    type: str
    severity: str
    outcome: str = "unknown"
    node_name: str = ""
    data: dict[str, Any] = {}
    error: OccurrenceError | None = None


_decoder = msgspec.json.Decoder(ForwardedDoc)


def record_from_doc(raw: bytes) -> Record:
    """A forwarded document as a Record (``msgspec`` errors for a document that is not one)."""
    d = _decoder.decode(raw)
    occ = Occurrence(
        d.id,
        d.timestamp,
        d.source,
        d.type,
        d.severity if d.severity in SEVERITY_RANK else "info",  # type: ignore[arg-type]
        d.outcome if d.outcome in _OUTCOMES else "unknown",  # type: ignore[arg-type]
        PROTOCOL_VERSION,
        d.error,
        None,
        d.data,
    )
    ts = d.timestamp_unix_nanos
    return Record(path="", name=d.id, occ=occ, ts_ns=ts, forwarded=Forwarded(d.node_name, raw))


class RemoteError(Exception):
    """The controller cannot be asked (unreachable, refused, or an answer that is not ours)."""


@dataclass(frozen=True, slots=True)
class Controller:
    """Where the CLI asks: the base URL, the bearer token and (for https) a CA file."""

    url: str
    token: str | None = None
    ca_file: str | None = None

    @classmethod
    def from_args(cls, url: str, token_file: str | None, ca_file: str | None) -> Controller:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"--controller {url!r}: expected http(s)://HOST:PORT")
        token = None
        if token_file is not None:
            try:
                token = Path(token_file).read_text(encoding="utf-8", errors="replace").strip()
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise RemoteError(f"cannot read --token-file {token_file}: {reason}") from None
            if not token:
                raise RemoteError(f"--token-file {token_file} is empty")
        return cls(url.rstrip("/"), token, ca_file)

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        ctx = ssl.create_default_context(cafile=self.ca_file) if url.startswith("https:") else None
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=ctx) as resp:
                body = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise RemoteError(f"controller {self.url}: {_refusal(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"cannot reach controller {self.url}: {reason}") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise RemoteError(f"controller {self.url}: answer larger than {MAX_RESPONSE_BYTES}")
        try:
            return json.loads(body)
        except ValueError:
            raise RemoteError(f"controller {self.url}: answer is not JSON") from None

    def evidence(self, query: list[tuple[str, str]], limit: int | None) -> Iterator[Record]:
        """Matching occurrences, newest first, at most ``limit`` (None: all the window holds)."""
        cursor: str | None = None
        left = limit
        for _ in range(MAX_PAGES):
            page = PAGE_LIMIT if left is None else min(PAGE_LIMIT, left)
            q = [*query, ("limit", str(page))] + ([("cursor", cursor)] if cursor else [])
            answer = self.get("/v1/evidence", q)
            items = answer.get("evidence") if isinstance(answer, dict) else None
            if not isinstance(items, list):
                raise RemoteError(f"controller {self.url}: unexpected /v1/evidence answer")
            for item in items:
                try:
                    yield record_from_doc(msgspec.json.encode(item))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # not an occurrence document: nothing to show
            if left is not None:
                left -= len(items)
                if left <= 0:
                    return
            cursor = answer.get("next_cursor")
            if not isinstance(cursor, str) or not items:
                return


def _refusal(exc: urllib.error.HTTPError) -> str:
    """``401 UNAUTHORIZED: missing bearer token`` from the wire error envelope, if any."""
    try:
        err = json.loads(exc.read(65_536))["error"]
        return f"{exc.code} {err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {exc.code}"
