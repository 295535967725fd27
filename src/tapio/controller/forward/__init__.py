"""Forwarding accepted occurrences to downstream systems (``--forward URL``, repeatable).

``nats://HOST:PORT`` publishes to NATS JetStream, ``otlp+http(s)://HOST:PORT`` sends OTLP/HTTP
logs, ``file:///DIR`` writes JSON lines. See
:mod:`tapio.controller.forward.engine` for the delivery guarantees (bounded queue, 503 when
full, retries without duplicates, drain on SIGTERM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from tapio.controller.forward import file as file_output
from tapio.controller.forward.engine import (
    DEFAULT_DRAIN_GRACE,
    DEFAULT_QUEUE_MAX_EVENTS,
    Forwarder,
    Output,
)
from tapio.controller.forward.record import Record, build_records, ingest_records

__all__ = [
    "DEFAULT_DRAIN_GRACE",
    "DEFAULT_QUEUE_MAX_EVENTS",
    "ForwardSettings",
    "Forwarder",
    "Output",
    "Record",
    "build_output",
    "build_records",
    "ingest_records",
]


# Defaults of the NATS output, here so that building settings does not import nats-py.
NATS_DEFAULT_STREAM: Final = "TAPIO_EVIDENCE"
NATS_DEFAULT_MAX_AGE: Final = 7 * 24 * 3600.0
NATS_DEFAULT_MAX_BYTES: Final = 1 << 30
NATS_DEFAULT_DUPLICATE_WINDOW: Final = 600.0


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    nats_stream: str = NATS_DEFAULT_STREAM
    nats_max_age: float = NATS_DEFAULT_MAX_AGE
    nats_max_bytes: int = NATS_DEFAULT_MAX_BYTES
    nats_duplicate_window: float = NATS_DEFAULT_DUPLICATE_WINDOW
    file_max_bytes: int = file_output.DEFAULT_MAX_BYTES
    file_max_files: int = file_output.DEFAULT_MAX_FILES


def build_output(url: str, settings: ForwardSettings, logger: Any = None) -> Output:
    """The output for ``url``; ValueError (message without credentials) for anything else."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "nats":
        from tapio.controller.forward import nats as nats_output  # nats-py only when used

        return nats_output.NatsOutput(
            url,
            stream=settings.nats_stream,
            max_age=settings.nats_max_age,
            max_bytes=settings.nats_max_bytes,
            duplicate_window=settings.nats_duplicate_window,
            logger=logger,
        )
    if scheme == "file":
        return file_output.FileOutput(
            url, max_bytes=settings.file_max_bytes, max_files=settings.file_max_files
        )
    if scheme in ("otlp+http", "otlp+https"):
        from tapio.controller.forward.otlp import OtlpOutput

        return OtlpOutput(url)
    raise ValueError(f"unsupported --forward scheme {scheme + '://' if scheme else repr('')}")
