"""Controller test helpers: bodies, a capturing logger, servers on real TCP (127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog
from aiohttp import web
from structlog.testing import CapturingLogger

from tapio.controller import Controller
from tapio.profile import PRODUCTION_DEFAULT_HASH

JSON = {"Content-Type": "application/json"}
V = "tapio-wire/v1"


def capturing_logger() -> tuple[Any, CapturingLogger]:
    cap = CapturingLogger()
    return structlog.wrap_logger(cap, processors=[], wrapper_class=structlog.BoundLogger), cap


def hello(agent_id: str = "agent-1", **kw: Any) -> dict[str, Any]:
    body = {
        "wire_version": V,
        "agent_id": agent_id,
        "node_name": "node-a",
        "tapio_version": "0.1.0",
        "kernel_release": "6.18.0",
        "arch": "x86_64",
    }
    body.update(kw)
    return body


def counters(n: int = 0) -> dict[str, int]:
    return {
        "events_total": n,
        "malformed_events_total": 0,
        "lost_events_total": 0,
        "correlation_drops_total": 0,
        "sink_drops_total": 0,
        "controller_send_failures_total": 0,
    }


def heartbeat(
    agent_id: str = "agent-1", config_hash: str = PRODUCTION_DEFAULT_HASH, **kw: Any
) -> dict[str, Any]:
    body = {
        "wire_version": V,
        "agent_id": agent_id,
        "node_name": "node-a",
        "config_version": "1",
        "config_hash": config_hash,
        "uptime_seconds": 5,
        "observers": {
            "network": "running",
            "storage": "running",
            "container": "running",
            "node": "degraded",
        },
        "counters": counters(3),
        "degraded_reasons": ["pmc_unsupported"],
    }
    body.update(kw)
    return body


def event(**kw: Any) -> dict[str, Any]:
    body = {
        "type": "kernel.network.connection_refused",
        "timestamp_unix_nanos": 1_700_000_000_000_000_000,
        "observer": "network",
        "severity": "warning",
        "facts": {"dst_port": 443, "dst_addr": "10.0.0.1"},
    }
    body.update(kw)
    return body


def batch(agent_id: str = "agent-1", sequence: int = 1, n: int = 1, **kw: Any) -> dict[str, Any]:
    body = {
        "wire_version": V,
        "agent_id": agent_id,
        "node_name": "node-a",
        "sequence": sequence,
        "sent_at_unix_nanos": 1_700_000_000_000_000_000,
        "events": [event() for _ in range(n)],
    }
    body.update(kw)
    return body


def enc(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


@contextlib.asynccontextmanager
async def running(controller: Controller) -> AsyncIterator[str]:
    """Serve ``controller`` on 127.0.0.1, an OS-chosen port; yields the base URL."""
    runner = web.AppRunner(controller.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


class ThreadServer:
    """A controller on its own event loop thread, for synchronous (hypothesis) clients."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with running(self.controller) as url:
            self.port = int(url.rsplit(":", 1)[1])
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("controller thread did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.loop.close()
