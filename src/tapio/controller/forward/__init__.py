"""Forwarding accepted occurrences to downstream systems (``--forward URL``, repeatable).

``nats://HOST:PORT`` publishes to NATS JetStream, ``file:///DIR`` writes JSON lines. See
:mod:`tapio.controller.forward.engine` for the delivery guarantees (bounded queue, 503 when
full, retries without duplicates, drain on SIGTERM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapio.controller.forward import file as file_output
from tapio.controller.forward import nats as nats_output
from tapio.controller.forward.engine import (
    DEFAULT_DRAIN_GRACE,
    DEFAULT_QUEUE_MAX_EVENTS,
    Forwarder,
    Output,
)
from tapio.controller.forward.record import Record, build_records

__all__ = [
    "DEFAULT_DRAIN_GRACE",
    "DEFAULT_QUEUE_MAX_EVENTS",
    "ForwardSettings",
    "Forwarder",
    "Output",
    "Record",
    "build_output",
    "build_records",
]


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    nats_stream: str = nats_output.DEFAULT_STREAM
    nats_max_age: float = nats_output.DEFAULT_MAX_AGE
    nats_max_bytes: int = nats_output.DEFAULT_MAX_BYTES
    nats_duplicate_window: float = nats_output.DEFAULT_DUPLICATE_WINDOW
    file_max_bytes: int = file_output.DEFAULT_MAX_BYTES
    file_max_files: int = file_output.DEFAULT_MAX_FILES


def build_output(url: str, settings: ForwardSettings, logger: Any = None) -> Output:
    """The output for ``url``; ValueError (message without credentials) for anything else."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "nats":
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
        raise ValueError("otlp+http(s):// forwarding is not available in this version")
    raise ValueError(f"unsupported --forward scheme {scheme + '://' if scheme else repr('')}")
