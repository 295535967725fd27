"""The ``[otlp]`` settings and the ``OTEL_*`` environment, merged into one :class:`OtlpSettings`.

People who run OpenTelemetry configure exporters with the standard ``OTEL_EXPORTER_OTLP_*``
variables; Tapio honours them so a collector set up for every other workload also receives
Tapio's records. Precedence, highest first (docs/sinks.md):

1. a key in the ``[otlp]`` TOML section (or the ``--otlp-endpoint`` flag, which sets ``endpoint``);
2. the logs-specific variable (``OTEL_EXPORTER_OTLP_LOGS_*``);
3. the generic variable (``OTEL_EXPORTER_OTLP_*``);
4. the built-in default.

``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` is the full URL and used as it is; the generic endpoint and
the TOML ``endpoint`` are base URLs that get ``/v1/logs`` appended. Header values are credentials:
no error message, ``repr`` or log event ever contains one.

This module imports no protobuf code: the agent checks a config file's ``[otlp]`` keys at start
without loading the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import unquote

import msgspec

from tapio.sinks.delivery import DeliverySettings
from tapio.transport import check_header, parse_endpoint, redacted_headers

LOGS_PATH: Final = "/v1/logs"
DEFAULT_ENDPOINT: Final = "http://localhost:4318"
Protocol = Literal["http/protobuf", "http/json"]
Compression = Literal["gzip", "none"]
PROTOCOLS: Final = ("http/protobuf", "http/json")
COMPRESSIONS: Final = ("gzip", "none")
#: Headers the exporter sets itself; a configured one would corrupt the request.
_RESERVED_HEADERS: Final = ("content-type", "content-encoding", "content-length", "host")
_MAX_ENV_ENTRIES: Final = 64


class OtlpSettings(DeliverySettings, kw_only=True, forbid_unknown_fields=True):
    """The ``[otlp]`` section of the agent configuration; the delivery knobs are
    :class:`DeliverySettings` (OTLP batches more per request and flushes less often).

    ``auth_header`` is sent verbatim as ``Authorization``; it and every value of ``headers`` are
    redacted from ``repr`` and never logged. :func:`resolve` fills unset keys from ``OTEL_*``.
    """

    #: Base URL, ``http://`` or ``https://``; the sink POSTs to ``<endpoint>/v1/logs``.
    endpoint: str = DEFAULT_ENDPOINT
    #: Full export URL used as it is (``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT``); wins over ``endpoint``.
    logs_endpoint: str | None = None
    #: Value of the ``Authorization`` header (e.g. ``"Bearer abc"``); CR, LF and NUL rejected.
    auth_header: str | None = None
    #: Extra request headers (e.g. a tenant id or API key); CR, LF and NUL rejected.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: ``http/protobuf`` (binary protobuf) or ``http/json`` (the OTLP JSON encoding).
    protocol: Protocol = "http/protobuf"
    #: ``gzip`` or ``none``.
    compression: Compression = "gzip"
    #: ``service.name`` of the resource.
    service_name: str = "tapio"
    #: Extra resource attributes (``OTEL_RESOURCE_ATTRIBUTES``); they win over detected ones.
    resource_attributes: dict[str, str] = msgspec.field(default_factory=dict)
    #: At most this many bytes of (uncompressed) protobuf log records per request.
    max_batch_bytes: int = 4 * 1024 * 1024
    flush_interval_secs: float = 5.0

    def __post_init__(self) -> None:
        parse_endpoint(self.export_url(), what="otlp")
        if self.auth_header is not None:
            if not self.auth_header.strip():
                raise ValueError("otlp.auth_header must not be empty")
            check_header("Authorization", self.auth_header, what="otlp.auth_header")
        for name, value in self.headers.items():
            check_header(name, value, what="otlp.headers")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"otlp.headers: {name!r} is set by the sink")
        if not self.service_name.strip():
            raise ValueError("otlp.service_name must not be empty")
        self.validate_delivery("otlp")

    def export_url(self) -> str:
        """``logs_endpoint`` as it is, else ``<endpoint>/v1/logs`` (trailing slashes stripped)."""
        if self.logs_endpoint is not None:
            return self.logs_endpoint.strip()
        return self.endpoint.strip().rstrip("/") + LOGS_PATH

    def __repr__(self) -> str:
        auth = None if self.auth_header is None else "***"
        return (
            f"OtlpSettings(url={self.export_url()!r}, protocol={self.protocol!r}, "
            f"compression={self.compression!r}, auth_header={auth!r}, "
            f"headers={redacted_headers(self.headers)!r}, batch_size={self.batch_size}, "
            f"flush_interval_secs={self.flush_interval_secs}, ca_file={self.ca_file!r})"
        )

    def __rich_repr__(self) -> Any:
        yield "url", self.export_url()
        yield "auth_header", None if self.auth_header is None else "***"
        yield "headers", redacted_headers(self.headers)


def parse_kv_list(text: str, *, what: str, secret: bool = False) -> dict[str, str]:
    """A ``key1=value1,key2=value2`` list (W3C baggage style), keys and values percent-decoded.

    Empty members are skipped; a member without ``=`` or with an empty key is an error naming
    the member's position, never its text when ``secret`` (header values are credentials).
    """
    out: dict[str, str] = {}
    members = [m for m in text.split(",") if m.strip()]
    if len(members) > _MAX_ENV_ENTRIES:
        raise ValueError(f"{what}: more than {_MAX_ENV_ENTRIES} entries")
    for i, member in enumerate(members, 1):
        key, sep, value = member.partition("=")
        key = unquote(key.strip())
        if not sep or not key:
            shown = f"entry {i}" if secret else f"entry {i} ({member.strip()!r})"
            raise ValueError(f"{what}: {shown} is not key=value")
        out[key] = unquote(value.strip())
    return out


def _env(env: Mapping[str, str], suffix: str) -> tuple[str, str] | None:
    """(variable name, value) of the logs-specific variable, else the generic one."""
    for name in (f"OTEL_EXPORTER_OTLP_LOGS_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    v = value.lower()
    if name.endswith("PROTOCOL") and v == "grpc":
        raise ValueError(
            f"{name}=grpc: Tapio exports OTLP over HTTP only; use http/protobuf or http/json "
            "(the collector's OTLP/HTTP receiver, port 4318 by default)"
        )
    if v not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return v


def from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``[otlp]`` keys the ``OTEL_*`` variables set (logs-specific before generic)."""
    doc: dict[str, Any] = {}
    if (v := env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "").strip()) != "":
        doc["logs_endpoint"] = v
    elif (v := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()) != "":
        doc["endpoint"] = v
    if (found := _env(env, "HEADERS")) is not None:
        doc["headers"] = parse_kv_list(found[1], what=found[0], secret=True)
    if (found := _env(env, "PROTOCOL")) is not None:
        doc["protocol"] = _choice(found[0], found[1], PROTOCOLS)
    if (found := _env(env, "COMPRESSION")) is not None:
        doc["compression"] = _choice(found[0], found[1], COMPRESSIONS)
    if (found := _env(env, "TIMEOUT")) is not None:
        try:
            ms = int(found[1])
        except ValueError:
            raise ValueError(f"{found[0]}: expected milliseconds, got {found[1]!r}") from None
        if not 0 < ms <= 600_000:
            raise ValueError(f"{found[0]}: must be in 1..600000 ms, got {ms}")
        doc["timeout_secs"] = ms / 1000
    if (found := _env(env, "CERTIFICATE")) is not None:
        doc["ca_file"] = found[1]
    attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if attrs.strip():
        doc["resource_attributes"] = parse_kv_list(attrs, what="OTEL_RESOURCE_ATTRIBUTES")
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        doc["service_name"] = service
    elif "service.name" in doc.get("resource_attributes", {}):
        doc["service_name"] = doc["resource_attributes"]["service.name"]
    return doc


def resolve(section: Mapping[str, Any], env: Mapping[str, str]) -> OtlpSettings:
    """``[otlp]`` (``section``) over the ``OTEL_*`` environment over the defaults.

    A TOML ``endpoint`` hides both environment endpoints (the configuration file names the
    collector); an unknown key or a bad value raises ``ValueError`` /
    ``msgspec.ValidationError`` naming it.
    """
    doc = from_environment(env)
    if "endpoint" in section or "logs_endpoint" in section:
        doc.pop("endpoint", None)
        doc.pop("logs_endpoint", None)
    doc.update(section)
    return msgspec.convert(doc, OtlpSettings)
