"""The agent's one HTTP server: ``/metrics``, ``/healthz`` and ``/readyz`` (docs/sinks.md).

One slow or broken client cannot stop it (a probe that hangs must not take the metrics down):
every connection is its own task, idle or half-sent connections are closed after
``keepalive_timeout_secs`` (aiohttp starts that timer when the connection opens), request lines,
headers and bodies are small and bounded, and handlers never block.

Usage (the agent)::

    async with serve(settings, readiness) as server:  # no-op when settings.enabled is False
        ...
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tapio.agent.settings import MetricsServerSettings
from tapio.metrics import REGISTRY

log = structlog.get_logger("tapio.agent.httpserver")

#: ``readiness()`` returns (ready, reasons): reasons maps a component to why it is not ready
#: (or to its state); it is returned as the JSON body of ``/readyz``.
Readiness = Callable[[], tuple[bool, dict[str, str]]]

_MAX_LINE = 4096
_MAX_FIELD = 4096
_MAX_HEADERS = 32
_MAX_BODY = 1024


class _DropBadRequestTracebacks(logging.Filter):
    """aiohttp logs every malformed request (too long, garbage) with a traceback; a hostile
    client could flood the agent's logs that way. Handler errors are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_server_logger = logging.getLogger("tapio.agent.httpserver.aiohttp")
_server_logger.addFilter(_DropBadRequestTracebacks())


class RunningServer:
    """A started server: where it listens (``port`` is the real one when 0 was asked for)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def make_app(readiness: Readiness) -> web.Application:
    """The aiohttp application (exposed for tests and embedding)."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n", content_type="text/plain")

    async def readyz(_: web.Request) -> web.Response:
        try:
            ready, reasons = readiness()
        except Exception as exc:  # a broken probe means "not ready", never a 500
            ready, reasons = False, {"readiness": f"probe failed: {type(exc).__name__}"}
        body = json.dumps(
            {"ready": bool(ready), "reasons": {str(k): str(v) for k, v in reasons.items()}},
            sort_keys=True,
        )
        return web.Response(
            text=body + "\n", status=200 if ready else 503, content_type="application/json"
        )

    app = web.Application(client_max_size=_MAX_BODY)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@asynccontextmanager
async def serve(
    settings: MetricsServerSettings, readiness: Readiness
) -> AsyncIterator[RunningServer | None]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` while the context is open.

    Yields None (and binds nothing) when ``settings.enabled`` is False. Binding errors (port in
    use, address not local) raise ``OSError`` on entry: a start-up error for the agent.
    """
    if not settings.enabled:
        yield None
        return
    runner = web.AppRunner(
        make_app(readiness),
        handle_signals=False,
        access_log=None,
        logger=_server_logger,
        keepalive_timeout=settings.keepalive_timeout_secs,
        max_line_size=_MAX_LINE,
        max_field_size=_MAX_FIELD,
        max_headers=_MAX_HEADERS,
        shutdown_timeout=settings.shutdown_timeout_secs,
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            host=settings.bind_address,
            port=settings.port,
            backlog=512,
            reuse_address=True,
        )
        await site.start()
        port = settings.port
        for address in runner.addresses:
            port = int(address[1])
        server = RunningServer(runner, settings.bind_address, port)
        log.info("metrics server listening", url=server.base_url)
        yield server
    finally:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(settings.shutdown_timeout_secs + 1),
        ):
            await runner.cleanup()


async def serve_forever(settings: MetricsServerSettings, readiness: Readiness) -> None:
    """Run :func:`serve` until cancelled (for a task group); returns at once when disabled."""
    async with serve(settings, readiness) as server:
        if server is None:
            return
        await anyio.sleep_forever()
