"""OTLP sink: occurrences exported as OpenTelemetry log records over OTLP/HTTP (protobuf + gzip).

The request is built with the official ``opentelemetry-proto`` classes (no hand encoding) and
POSTed to ``<endpoint>/v1/logs``. Host names resolve, ``https://`` works with certificate
verification, every ``data`` fact is exported as a typed attribute (plus id, type, source,
outcome and error code), severity numbers and texts follow the OpenTelemetry log data model, and
batches are retried and bounded by the shared delivery engine (:mod:`tapio.sinks.delivery`).
See docs/sinks.md for the mapping table.
"""

from __future__ import annotations

import gzip
import os
import socket
from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp
import anyio
import msgspec
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

import tapio
from tapio.occurrence import Occurrence, parse_timestamp
from tapio.sinks.delivery import DeliverySettings, DeliverySink
from tapio.transport import (
    Attempt,
    check_header,
    classify_status,
    parse_endpoint,
    read_bounded,
    redacted_headers,
)

LOGS_PATH = "/v1/logs"

#: Occurrence severity -> (OpenTelemetry SeverityNumber, severity text) per the log data model.
SEVERITY: dict[str, tuple[int, str]] = {
    "debug": (5, "DEBUG"),
    "info": (9, "INFO"),
    "warning": (13, "WARN"),
    "error": (17, "ERROR"),
    "critical": (21, "FATAL"),
}

#: Attribute keys Tapio sets itself; a ``data`` fact with one of these names is not exported.
RESERVED_KEYS = frozenset(
    {"occurrence.id", "anomaly.type", "tapio.source", "tapio.outcome", "error.code"}
)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_DEPTH = 8
#: Payloads larger than this are gzipped in a worker thread so the event loop stays responsive.
_THREAD_GZIP_BYTES = 256 * 1024


class OtlpSettings(DeliverySettings, kw_only=True):
    """The ``[otlp]`` section of the agent configuration; the delivery knobs are
    :class:`DeliverySettings` (OTLP batches more per request and flushes less often).

    ``auth_header`` is sent verbatim as ``Authorization``; it and every value of ``headers`` are
    redacted from ``repr`` and never logged.
    """

    #: Base URL, ``http://`` or ``https://``; the sink POSTs to ``<endpoint>/v1/logs``.
    endpoint: str = "http://localhost:4318"
    #: Value of the ``Authorization`` header (e.g. ``"Bearer abc"``); CR, LF and NUL rejected.
    auth_header: str | None = None
    #: Extra request headers (e.g. a tenant id or API key); CR, LF and NUL rejected.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: At most this many bytes of (uncompressed) protobuf log records per request.
    max_batch_bytes: int = 4 * 1024 * 1024
    flush_interval_secs: float = 5.0

    def __post_init__(self) -> None:
        parse_endpoint(self.endpoint, what="otlp")
        if self.auth_header is not None:
            if not self.auth_header.strip():
                raise ValueError("otlp.auth_header must not be empty")
            check_header("Authorization", self.auth_header, what="otlp.auth_header")
        for name, value in self.headers.items():
            check_header(name, value, what="otlp.headers")
            if name.lower() in ("content-type", "content-encoding", "content-length", "host"):
                raise ValueError(f"otlp.headers: {name!r} is set by the sink")
        self.validate_delivery("otlp")

    def export_url(self) -> str:
        """``<endpoint>/v1/logs`` with the endpoint's trailing slashes stripped."""
        return self.endpoint.strip().rstrip("/") + LOGS_PATH

    def __repr__(self) -> str:
        auth = None if self.auth_header is None else "***"
        return (
            f"OtlpSettings(endpoint={self.endpoint!r}, auth_header={auth!r}, "
            f"headers={redacted_headers(self.headers)!r}, batch_size={self.batch_size}, "
            f"flush_interval_secs={self.flush_interval_secs}, ca_file={self.ca_file!r})"
        )

    def __rich_repr__(self) -> Any:
        yield "endpoint", self.endpoint
        yield "auth_header", None if self.auth_header is None else "***"
        yield "headers", redacted_headers(self.headers)


class OtlpResource(msgspec.Struct, kw_only=True, frozen=True):
    """The OTLP resource describing this agent."""

    service_name: str = "tapio"
    service_version: str = tapio.__version__
    host_name: str = msgspec.field(default_factory=socket.gethostname)
    #: ``k8s.node.name``; exported only when known.
    k8s_node_name: str | None = None

    @classmethod
    def detect(cls) -> OtlpResource:
        """Host name from the kernel; node name from ``TAPIO_NODE_NAME`` (downward API)."""
        node = os.environ.get("TAPIO_NODE_NAME") or None
        return cls(k8s_node_name=node)

    def to_proto(self) -> Resource:
        attrs = [
            _kv("service.name", self.service_name),
            _kv("service.version", self.service_version),
            _kv("host.name", self.host_name),
        ]
        if self.k8s_node_name:
            attrs.append(_kv("k8s.node.name", self.k8s_node_name))
        return Resource(attributes=attrs)


def any_value(value: object, depth: int = 0) -> AnyValue:
    """A Python value as a typed ``AnyValue`` (bool, int64, double, string, bytes, array, kvlist).

    Integers outside int64 and unknown types become strings; ``None`` is an empty AnyValue.
    """
    if value is None:
        return AnyValue()
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return AnyValue(int_value=value)
        return AnyValue(string_value=str(value))
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bytes | bytearray):
        return AnyValue(bytes_value=bytes(value))
    if depth < _MAX_DEPTH:
        if isinstance(value, list | tuple):
            return AnyValue(array_value=ArrayValue(values=[any_value(v, depth + 1) for v in value]))
        if isinstance(value, Mapping):
            return AnyValue(
                kvlist_value=KeyValueList(
                    values=[
                        KeyValue(key=str(k), value=any_value(v, depth + 1))
                        for k, v in value.items()
                    ]
                )
            )
    return AnyValue(string_value=str(value))


def _kv(key: str, value: object) -> KeyValue:
    return KeyValue(key=key, value=any_value(value))


def to_log_record(occ: Occurrence, observed_ns: int) -> LogRecord:
    """One occurrence as one OTLP LogRecord (see the mapping table in docs/sinks.md)."""
    try:
        time_ns = parse_timestamp(occ.timestamp)
    except ValueError:
        time_ns = 0  # "unknown" in OTLP; observed_time_unix_nano still orders the record
    number, text = SEVERITY.get(occ.severity, (0, ""))
    attrs = [
        _kv("occurrence.id", occ.id),
        _kv("anomaly.type", occ.type),
        _kv("tapio.source", occ.source),
        _kv("tapio.outcome", occ.outcome),
    ]
    if occ.error is not None:
        attrs.append(_kv("error.code", occ.error.code))
    if occ.data:
        for key, value in occ.data.items():
            if key not in RESERVED_KEYS:
                attrs.append(_kv(key, value))
    body = occ.error.message if occ.error is not None else occ.type
    return LogRecord(
        time_unix_nano=max(0, time_ns),
        observed_time_unix_nano=observed_ns,
        severity_number=number,  # type: ignore[arg-type]  # plain int is the enum's value
        severity_text=text,
        body=AnyValue(string_value=body),
        attributes=attrs,
    )


def build_request(resource: Resource, records: list[LogRecord]) -> ExportLogsServiceRequest:
    """One ResourceLogs / one ScopeLogs (scope ``tapio``) holding ``records``."""
    scope = InstrumentationScope(name="tapio", version=tapio.__version__)
    return ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=resource, scope_logs=[ScopeLogs(scope=scope, log_records=records)]
            )
        ]
    )


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


class OtlpSink(DeliverySink[LogRecord]):
    """OTLP/HTTP logs exporter (``application/x-protobuf``, ``Content-Encoding: gzip``).

    Construction fails on invalid settings or an unreadable ``ca_file`` (start-up error).
    """

    name: ClassVar[str] = "otlp"

    def __init__(self, settings: OtlpSettings, resource: OtlpResource) -> None:
        self.settings = settings
        self.resource = resource
        url = parse_endpoint(settings.export_url(), what="otlp")
        self._resource_pb = resource.to_proto()
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "User-Agent": f"tapio/{tapio.__version__}",
        }
        headers.update(settings.headers)
        if settings.auth_header is not None:
            headers["Authorization"] = settings.auth_header
        self._headers = headers
        super().__init__(settings.delivery_config(url))

    def __repr__(self) -> str:
        return f"OtlpSink(url={self._safe_url()!r}, headers={redacted_headers(self._headers)!r})"

    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[LogRecord, int]:
        record = to_log_record(occ, observed_ns)
        return record, record.ByteSize() + 4  # + field tag and length prefix

    async def post(self, session: aiohttp.ClientSession, items: list[LogRecord]) -> Attempt:
        raw = build_request(self._resource_pb, items).SerializeToString()
        if len(raw) > _THREAD_GZIP_BYTES:
            body = await anyio.to_thread.run_sync(_gzip, raw)
        else:
            body = _gzip(raw)
        async with session.post(
            self._cfg.url, data=body, headers=self._headers, allow_redirects=False
        ) as resp:
            payload = await read_bounded(resp)
            attempt = classify_status(resp.status, resp.headers.get("Retry-After"))
            if attempt.outcome == "ok":
                rejected = _partial_rejections(resp.headers.get("Content-Type", ""), payload)
                if rejected:
                    return Attempt("ok", attempt.detail, rejected_items=rejected)
            return attempt


def _partial_rejections(content_type: str, payload: bytes) -> int:
    """``partial_success.rejected_log_records`` of a protobuf ExportLogsServiceResponse."""
    if not payload or "protobuf" not in content_type:
        return 0
    response = ExportLogsServiceResponse()
    try:
        response.ParseFromString(payload)
    except Exception:  # a malformed success answer is still a success
        return 0
    rejected = int(response.partial_success.rejected_log_records)
    return max(0, rejected)
