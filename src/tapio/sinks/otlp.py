"""OTLP sink: occurrences exported as OpenTelemetry log records over OTLP/HTTP.

The mapping (semantic-convention attribute names, severities, resource) is
:mod:`tapio.sinks.otlp_records`, shared with the controller's ``otlp+http`` output; the settings
and the ``OTEL_*`` environment are :mod:`tapio.sinks.otlp_config`. Requests are protobuf or OTLP
JSON, gzip-compressed or not, POSTed to ``<endpoint>/v1/logs`` (or the logs endpoint as given).
Host names resolve, ``https://`` works with certificate verification, and batches are retried
and bounded by the shared delivery engine (:mod:`tapio.sinks.delivery`). See docs/sinks.md.
"""

from __future__ import annotations

from typing import ClassVar

import aiohttp
import anyio
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

import tapio
from tapio.occurrence import Occurrence
from tapio.sinks.delivery import DeliverySink
from tapio.sinks.otlp_config import LOGS_PATH, OtlpSettings
from tapio.sinks.otlp_records import (
    SEVERITY,
    OtlpResource,
    any_value,
    build_request,
    encode_request,
    partial_rejections,
    record_size,
    request_headers,
    to_log_record,
)
from tapio.transport import Attempt, classify_status, parse_endpoint, read_bounded, redacted_headers

#: Batches larger than this are encoded (and compressed) in a worker thread so the event loop
#: stays responsive.
_THREAD_ENCODE_BYTES = 256 * 1024

__all__ = [
    "LOGS_PATH",
    "SEVERITY",
    "OtlpResource",
    "OtlpSettings",
    "OtlpSink",
    "any_value",
    "build_request",
    "to_log_record",
]


class OtlpSink(DeliverySink[LogRecord]):
    """OTLP/HTTP logs exporter (``http/protobuf`` or ``http/json``, gzip or none).

    Construction fails on invalid settings or an unreadable ``ca_file`` (start-up error).
    """

    name: ClassVar[str] = "otlp"

    def __init__(self, settings: OtlpSettings, resource: OtlpResource) -> None:
        self.settings = settings
        self.resource = resource
        url = parse_endpoint(settings.export_url(), what="otlp")
        self._resource_pb = resource.to_proto()
        self._headers = request_headers(settings, f"tapio/{tapio.__version__}")
        super().__init__(settings.delivery_config(url))

    def __repr__(self) -> str:
        return f"OtlpSink(url={self._safe_url()!r}, headers={redacted_headers(self._headers)!r})"

    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[LogRecord, int]:
        record = to_log_record(occ, observed_ns)
        return record, record_size(record)

    def _encode(self, items: list[LogRecord]) -> bytes:
        return encode_request(build_request(self._resource_pb, items), self.settings)

    async def post(self, session: aiohttp.ClientSession, items: list[LogRecord]) -> Attempt:
        if sum(record_size(r) for r in items) > _THREAD_ENCODE_BYTES:
            body = await anyio.to_thread.run_sync(self._encode, items)
        else:
            body = self._encode(items)
        async with session.post(
            self._cfg.url, data=body, headers=self._headers, allow_redirects=False
        ) as resp:
            payload = await read_bounded(resp)
            attempt = classify_status(resp.status, resp.headers.get("Retry-After"))
            if attempt.outcome == "ok":
                rejected = partial_rejections(resp.headers.get("Content-Type", ""), payload)
                if rejected:
                    return Attempt("ok", attempt.detail, rejected_items=rejected)
            return attempt
