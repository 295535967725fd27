"""Occurrences as OTLP log records, named the way OpenTelemetry users look for them.

One mapping for the agent's ``otlp`` sink and the controller's ``otlp+http`` output
(docs/sinks.md has the table): the anomaly type is ``event.name``, the occurrence id
``log.record.uid``, the error code ``error.type``; facts that have a semantic-convention name
(``process.pid``, ``container.id``, ``k8s.pod.uid``, ``network.peer.address``, ...) are exported
under it, so a collector's processors and a backend's dashboards find them without knowing
Tapio; every other fact keeps its meaning under ``tapio.<fact>``.

Requests are built with the official ``opentelemetry-proto`` classes and encoded as binary
protobuf or as the OTLP JSON encoding, gzip-compressed or not.
"""

from __future__ import annotations

import gzip
import os
import socket
from collections.abc import Mapping
from typing import Final

import msgspec
from google.protobuf import json_format  # type: ignore[import-untyped]
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
from tapio.sinks.otlp_config import OtlpSettings

#: Occurrence severity -> (OpenTelemetry SeverityNumber, severity text) per the log data model.
SEVERITY: Final[dict[str, tuple[int, str]]] = {
    "debug": (5, "DEBUG"),
    "info": (9, "INFO"),
    "warning": (13, "WARN"),
    "error": (17, "ERROR"),
    "critical": (21, "FATAL"),
}

#: Occurrence facts that have an OpenTelemetry semantic-convention attribute name.
CONVENTIONS: Final[dict[str, str]] = {
    "pid": "process.pid",
    "comm": "process.executable.name",
    "exit_code": "process.exit.code",
    "tid": "thread.id",
    "container_id": "container.id",
    "container_runtime": "container.runtime",
    "pod_uid": "k8s.pod.uid",
    "pod_name": "k8s.pod.name",
    "pod_namespace": "k8s.namespace.name",
    "container_name": "k8s.container.name",
    "node_name": "k8s.node.name",
    "src_ip": "network.local.address",
    "src_port": "network.local.port",
    "dst_ip": "network.peer.address",
    "dst_port": "network.peer.port",
    "protocol": "network.transport",
    "family": "network.type",
}
#: The controller's ``workload_kind`` -> the attribute that carries ``workload_name``.
WORKLOAD_KINDS: Final[dict[str, str]] = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "ReplicaSet": "k8s.replicaset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
}
#: Every fact without a convention is exported as ``tapio.<fact>``.
TAPIO_PREFIX: Final = "tapio."
#: Allow-listed pod labels (controller enrichment) become ``k8s.pod.label.<key>``.
POD_LABEL_PREFIX: Final = "k8s.pod.label."

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_DEPTH = 8


class OtlpResource(msgspec.Struct, kw_only=True, frozen=True):
    """The OTLP resource describing the exporting Tapio process and its node."""

    service_name: str = "tapio"
    service_version: str = tapio.__version__
    host_name: str = msgspec.field(default_factory=socket.gethostname)
    #: ``k8s.node.name``; exported only when known.
    k8s_node_name: str | None = None
    #: Configured attributes (``OTEL_RESOURCE_ATTRIBUTES``, ``[otlp] resource_attributes``);
    #: they win over the detected ones, except ``service.name`` (``service_name``).
    attributes: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def detect(cls, settings: OtlpSettings | None = None) -> OtlpResource:
        """The node from ``TAPIO_NODE_NAME`` (downward API): inside a pod the kernel's host
        name is the pod's name, so the node name is the better ``host.name`` when it is set."""
        node = os.environ.get("TAPIO_NODE_NAME") or None
        host = node or socket.gethostname()
        if settings is None:
            return cls(host_name=host, k8s_node_name=node)
        return cls(
            service_name=settings.service_name,
            host_name=host,
            k8s_node_name=node,
            attributes=dict(settings.resource_attributes),
        )

    def to_proto(self) -> Resource:
        detected = (
            ("service.name", self.service_name),
            ("service.version", self.service_version),
            ("host.name", self.host_name),
            ("k8s.node.name", self.k8s_node_name),  # omitted when unknown
        )
        attrs: dict[str, object] = {k: v for k, v in detected if v}
        attrs.update((k, v) for k, v in self.attributes.items() if k != "service.name")
        return Resource(attributes=[_kv(k, v) for k, v in attrs.items()])


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


def attributes(occ: Occurrence) -> dict[str, object]:
    """The record's attributes by name: Tapio's own first, then every fact (conventional name,
    else ``tapio.<fact>``). A fact never replaces an attribute set before it."""
    out: dict[str, object] = {
        "event.name": occ.type,
        "log.record.uid": occ.id,
        "tapio.source": occ.source,
        "tapio.outcome": occ.outcome,
    }
    if occ.error is not None:
        out["error.type"] = occ.error.code
    data = occ.data or {}
    kind, name = data.get("workload_kind"), data.get("workload_name")
    workload = WORKLOAD_KINDS.get(kind) if isinstance(kind, str) else None
    if workload is not None and isinstance(name, str) and name:
        out[workload] = name
    else:
        workload = None
    for key, value in data.items():
        if workload is not None and key in ("workload_kind", "workload_name"):
            continue
        if key == "pod_labels" and isinstance(value, Mapping):
            for label, text in value.items():
                out.setdefault(POD_LABEL_PREFIX + str(label), text)
            continue
        out.setdefault(CONVENTIONS.get(key) or TAPIO_PREFIX + key, value)
    return out


def to_log_record(occ: Occurrence, observed_ns: int) -> LogRecord:
    """One occurrence as one OTLP LogRecord (see the mapping table in docs/sinks.md)."""
    try:
        time_ns = parse_timestamp(occ.timestamp)
    except ValueError:
        time_ns = 0  # "unknown" in OTLP; observed_time_unix_nano still orders the record
    number, text = SEVERITY.get(occ.severity, (0, ""))
    body = occ.error.message if occ.error is not None else occ.type
    return LogRecord(
        time_unix_nano=max(0, time_ns),
        observed_time_unix_nano=observed_ns,
        severity_number=number,  # type: ignore[arg-type]  # plain int is the enum's value
        severity_text=text,
        body=AnyValue(string_value=body),
        attributes=[_kv(k, v) for k, v in attributes(occ).items()],
        event_name=occ.type,
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


def request_headers(settings: OtlpSettings, user_agent: str) -> dict[str, str]:
    """Content type and encoding for the settings' protocol and compression, then the
    configured headers (``auth_header`` last, as ``Authorization``)."""
    headers = {
        "Content-Type": "application/json"
        if settings.protocol == "http/json"
        else "application/x-protobuf",
        "User-Agent": user_agent,
    }
    if settings.compression == "gzip":
        headers["Content-Encoding"] = "gzip"
    headers.update(settings.headers)
    if settings.auth_header is not None:
        headers["Authorization"] = settings.auth_header
    return headers


def encode_request(request: ExportLogsServiceRequest, settings: OtlpSettings) -> bytes:
    """The request body: protobuf or OTLP JSON (camelCase names, enums as numbers), gzipped
    when ``compression = "gzip"``."""
    if settings.protocol == "http/json":
        text: str = json_format.MessageToJson(request, use_integers_for_enums=True, indent=None)
        raw = text.encode()
    else:
        raw = request.SerializeToString()
    if settings.compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0)
    return raw


def partial_rejections(content_type: str, payload: bytes) -> int:
    """``partial_success.rejected_log_records`` of an ExportLogsServiceResponse (protobuf or
    JSON); a malformed success answer is still a success (0)."""
    if not payload:
        return 0
    response = ExportLogsServiceResponse()
    try:
        if "protobuf" in content_type:
            response.ParseFromString(payload)
        elif "json" in content_type:
            json_format.Parse(payload, response, ignore_unknown_fields=True)
        else:
            return 0
    except Exception:
        return 0
    return max(0, int(response.partial_success.rejected_log_records))


def record_size(record: LogRecord) -> int:
    """Bytes one record adds to a protobuf request (field tag and length prefix included)."""
    size: int = record.ByteSize() + 4
    return size


__all__ = [
    "CONVENTIONS",
    "SEVERITY",
    "WORKLOAD_KINDS",
    "OtlpResource",
    "any_value",
    "attributes",
    "build_request",
    "encode_request",
    "partial_rejections",
    "request_headers",
    "to_log_record",
]
