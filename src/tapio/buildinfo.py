"""What every Tapio process says about itself on ``/metrics``: its build and its process.

``tapio_build_info`` (always 1) carries the package version, the Python version and the git
commit the package was built from. The commit is known only when the build wrote it: the image
build writes ``tapio/BUILD_COMMIT`` from its ``TAPIO_GIT_COMMIT`` build argument
(deploy/Dockerfile); anything else (an editable checkout, a wheel built without it) says
``unknown`` rather than guessing from whatever directory the process runs in.

The process metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_open_fds``, ...) come from prometheus-client's ``ProcessCollector``, read from
``/proc/self`` at scrape time, so they cost nothing between scrapes.
"""

from __future__ import annotations

import platform
import re
from functools import cache
from importlib import resources
from typing import Final

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

import tapio

UNKNOWN: Final = "unknown"
#: Buckets (seconds) of the request-latency histograms: 5 ms (loopback) to 30 s (the longest
#: request timeout a sink or output allows by default is 10 s; beyond it is +Inf).
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


@cache
def git_commit() -> str:
    """The build's git commit (lower-case hex), or ``unknown``; a malformed file is unknown."""
    try:
        text = resources.files("tapio").joinpath("BUILD_COMMIT").read_text().strip().lower()
    except (OSError, UnicodeDecodeError):
        return UNKNOWN
    return text if _COMMIT.match(text) else UNKNOWN


def register_self_metrics(registry: CollectorRegistry) -> None:
    """Add ``tapio_build_info`` and the process collector to ``registry`` (once per registry)."""
    info = Gauge(
        "tapio_build_info",
        "Always 1; the labels say which Tapio build runs (git_commit: unknown unless the "
        "build recorded it)",
        ["version", "python_version", "git_commit"],
        registry=registry,
    )
    info.labels(tapio.__version__, platform.python_version(), git_commit()).set(1)
    ProcessCollector(registry=registry)
