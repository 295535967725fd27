"""structlog set-up shared by every entry point: JSON (default for daemons) or console, stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["json", "console"]
LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is *now* (tests and embedders swap it), and
    never raises if it was closed: logging must not take the agent down."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(ValueError, OSError):
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _stderr_factory(*_args: object) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r} (use {', '.join(LEVELS)})")
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        raise ValueError(f"unknown log format {fmt!r} (use json or console)")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_stderr_factory,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)
