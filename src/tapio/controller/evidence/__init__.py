"""The controller's evidence window and ``GET /v1/evidence`` (see :mod:`.window`, :mod:`.api`)."""

from tapio.controller.evidence.api import evidence_response
from tapio.controller.evidence.window import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_EVENTS,
    EvidenceWindow,
)

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_EVENTS",
    "EvidenceWindow",
    "evidence_response",
]
