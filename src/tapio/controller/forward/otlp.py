"""``otlp+http://HOST:PORT[/PREFIX]`` / ``otlp+https://`` output: OTLP/HTTP logs.

One implementation of the OTLP mapping: each record is turned back into an
:class:`~tapio.occurrence.Occurrence` and encoded by the agent's own
:func:`tapio.sinks.otlp.to_log_record` (same attributes, severity numbers and body), plus
``log.record.uid`` = the occurrence id, the key receivers use to drop a retried duplicate.
Records are grouped by node into one ResourceLogs each (``k8s.node.name`` and ``host.name`` =
the agent's node), sent to ``<endpoint>/v1/logs`` as gzip-compressed protobuf.

A 2xx answer delivers the chunk; 408, 429, 5xx and transport errors are retried by the lane;
any other answer (the receiver will never take this chunk) and TLS failures (never downgraded)
drop it, counted as ``reason="rejected"``.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
import msgspec
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

import tapio
from tapio.controller.forward.record import ForwardedOccurrence, Record
from tapio.occurrence import PROTOCOL_VERSION, Occurrence, OccurrenceError
from tapio.sinks.otlp import build_request, to_log_record
from tapio.transport import classify_exception, classify_status, parse_endpoint, tls_for

LOGS_PATH: Final = "/v1/logs"
TIMEOUT: Final = 10.0
MAX_ANSWER_BYTES: Final = 64 * 1024

_decoder = msgspec.json.Decoder(ForwardedOccurrence)


def _occurrence(doc: ForwardedOccurrence) -> Occurrence:
    error = OccurrenceError(doc.error.code, doc.error.message) if doc.error else None
    return Occurrence(
        doc.id,
        doc.timestamp,
        doc.source,
        doc.type,
        doc.severity,  # type: ignore[arg-type]  # the agent's severity words
        doc.outcome,  # type: ignore[arg-type]
        PROTOCOL_VERSION,
        error,
        None,
        dict(sorted(doc.data.items())),
    )


def _resource(node: str) -> Resource:
    def kv(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    return Resource(
        attributes=[
            kv("service.name", "tapio"),
            kv("service.version", tapio.__version__),
            kv("host.name", node),
            kv("k8s.node.name", node),
        ]
    )


def encode(records: Sequence[Record]) -> bytes:
    """The ExportLogsServiceRequest for ``records`` (one ResourceLogs per node), serialized."""
    observed = time.time_ns()
    by_node: dict[str, list[Any]] = {}
    for r in records:
        log = to_log_record(_occurrence(_decoder.decode(r.body)), observed)
        log.attributes.append(KeyValue(key="log.record.uid", value=AnyValue(string_value=r.id)))
        by_node.setdefault(r.node_name, []).append(log)
    request = ExportLogsServiceRequest()
    for node, logs in by_node.items():
        request.resource_logs.extend(build_request(_resource(node), logs).resource_logs)
    raw: bytes = request.SerializeToString()
    return raw


class OtlpOutput:
    def __init__(self, url: str, *, timeout: float = TIMEOUT, ca_file: str | None = None):
        scheme, sep, rest = url.partition("://")
        if scheme not in ("otlp+http", "otlp+https") or not sep:
            raise ValueError("not an otlp+http(s)://HOST:PORT URL")
        endpoint = parse_endpoint(f"{scheme[5:]}://{rest}", what="--forward otlp")
        base = endpoint.path.rstrip("/")
        self.url = endpoint.with_path(base + LOGS_PATH)
        self.name = f"{scheme}://{endpoint.host}:{endpoint.port}{base}"
        self._ssl = tls_for(endpoint, ca_file)
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.last_answer = ""

    async def connect(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
            )

    async def deliver(self, records: Sequence[Record]) -> list[bool | None]:
        assert self._session is not None
        body = gzip.compress(encode(records), compresslevel=6, mtime=0)
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "User-Agent": f"tapio-controller/{tapio.__version__}",
        }
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.content.read(MAX_ANSWER_BYTES)
                attempt = classify_status(resp.status, resp.headers.get("Retry-After"))
        except Exception as exc:
            attempt = classify_exception(exc)
        self.last_answer = attempt.detail
        if attempt.outcome == "ok":
            return [True] * len(records)
        if attempt.outcome == "retry":
            raise ConnectionError(attempt.detail)
        return [None] * len(records)  # final: the lane drops and counts them

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
