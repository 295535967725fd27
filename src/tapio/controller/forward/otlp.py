"""``otlp+http://HOST:PORT[/PREFIX]`` / ``otlp+https://`` output: OTLP/HTTP logs.

One implementation of OTLP: each record is turned back into an
:class:`~tapio.occurrence.Occurrence` and mapped by the agent's own
:mod:`tapio.sinks.otlp_records` (same attribute names, severity numbers and body; the
controller's Kubernetes enrichment becomes ``k8s.pod.name``, ``k8s.namespace.name``,
``k8s.deployment.name``, ...), and ``log.record.uid`` = the occurrence id is the key receivers
use to drop a retried duplicate. The ``OTEL_*`` environment is read by the agent's code too
(:func:`tapio.sinks.otlp_config.resolve`): protocol, compression, headers, timeout, service
name and resource attributes; the endpoint is always the ``--forward`` URL. Records are grouped
by node into one ResourceLogs each (``k8s.node.name`` and ``host.name`` = the agent's node) and
sent to ``<endpoint>/v1/logs``.

A 2xx answer delivers the chunk; 408, 429, 5xx and transport errors are retried by the lane;
any other answer (the receiver will never take this chunk) and TLS failures (never downgraded)
drop it, counted as ``reason="rejected"``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp
import msgspec
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

import tapio
from tapio.controller.forward.record import ForwardedOccurrence, Record
from tapio.occurrence import PROTOCOL_VERSION, Occurrence, OccurrenceError
from tapio.sinks.otlp_config import LOGS_PATH, OtlpSettings, resolve
from tapio.sinks.otlp_records import (
    OtlpResource,
    build_request,
    encode_request,
    request_headers,
    to_log_record,
)
from tapio.transport import classify_exception, classify_status, parse_endpoint, tls_for

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


def encode_request_for(
    records: Sequence[Record], settings: OtlpSettings | None = None
) -> ExportLogsServiceRequest:
    """The ExportLogsServiceRequest for ``records``: one ResourceLogs per node."""
    settings = settings or OtlpSettings()
    observed = time.time_ns()
    by_node: dict[str, list[Any]] = {}
    for r in records:
        by_node.setdefault(r.node_name, []).append(
            to_log_record(_occurrence(_decoder.decode(r.body)), observed)
        )
    request = ExportLogsServiceRequest()
    for node, logs in by_node.items():
        resource = OtlpResource(
            service_name=settings.service_name,
            host_name=node,
            k8s_node_name=node,
            attributes=dict(settings.resource_attributes),
        )
        request.resource_logs.extend(build_request(resource.to_proto(), logs).resource_logs)
    return request


class OtlpOutput:
    def __init__(
        self,
        url: str,
        *,
        timeout: float | None = None,
        ca_file: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        scheme, sep, rest = url.partition("://")
        if scheme not in ("otlp+http", "otlp+https") or not sep:
            raise ValueError("not an otlp+http(s)://HOST:PORT URL")
        endpoint = parse_endpoint(f"{scheme[5:]}://{rest}", what="--forward otlp")
        base = endpoint.path.rstrip("/")
        self.url = endpoint.with_path(base + LOGS_PATH)
        self.name = f"{scheme}://{endpoint.host}:{endpoint.port}{base}"
        env = os.environ if env is None else env
        # The URL names the collector; everything else may come from OTEL_* (the sink's rules).
        self.settings = resolve({"endpoint": str(endpoint.with_path(base))}, env)
        self._ssl = tls_for(endpoint, ca_file or self.settings.ca_file)
        self._timeout = self.settings.timeout_secs if timeout is None else timeout
        self._headers = request_headers(self.settings, f"tapio-controller/{tapio.__version__}")
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
        body = encode_request(encode_request_for(records, self.settings), self.settings)
        try:
            async with self._session.post(
                self.url, data=body, headers=self._headers, allow_redirects=False
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
