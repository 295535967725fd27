"""A kube-scheduler metrics endpoint of the test's own: real exposition text, changeable values.

The page is written the way kube-scheduler writes it (component-base metrics: ``[STABLE]``
help texts, ``profile``/``result`` labels, the 15 exponential buckets from 1 ms, the pending
pods gauge with its four queues) among other families a real page carries, so the controller's
filtering and parsing meet the real shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BUCKETS = tuple(0.001 * 2**i for i in range(15))  # ExponentialBuckets(0.001, 2, 15)
RESULTS = ("scheduled", "unschedulable", "error")
QUEUES = ("active", "backoff", "gated", "unschedulable")


def _fmt(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


@dataclass
class FakeScheduler:
    """Cumulative histogram counts per result and the pending pods per queue."""

    counts: dict[str, list[int]] = field(
        default_factory=lambda: {r: [0] * (len(BUCKETS) + 1) for r in RESULTS}
    )
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0.0))
    pending: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUEUES, 0))
    token: str | None = None
    status: int = 200
    body_override: bytes | None = None
    delay: float = 0.0
    requests: int = 0
    authorizations: list[str | None] = field(default_factory=list)

    def observe(self, n: int, seconds: float, result: str = "scheduled") -> None:
        """``n`` attempts of ``seconds`` each (the histogram's Observe)."""
        row = self.counts[result]
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                row[i] += n
        row[-1] += n
        self.sums[result] += n * seconds

    def reset(self) -> None:
        """The scheduler restarted: counters start from zero."""
        self.counts = {r: [0] * (len(BUCKETS) + 1) for r in RESULTS}
        self.sums = dict.fromkeys(RESULTS, 0.0)

    def page(self) -> str:
        lines = [
            "# HELP go_goroutines Number of goroutines that currently exist.",
            "# TYPE go_goroutines gauge",
            "go_goroutines 187",
            "# HELP scheduler_framework_extension_point_duration_seconds [STABLE] Latency for "
            "running all plugins of a specific extension point.",
            "# TYPE scheduler_framework_extension_point_duration_seconds histogram",
            'scheduler_framework_extension_point_duration_seconds_bucket{extension_point="Bind",'
            'profile="default-scheduler",status="Success",le="+Inf"} 40',
            'scheduler_framework_extension_point_duration_seconds_sum{extension_point="Bind",'
            'profile="default-scheduler",status="Success"} 0.3',
            'scheduler_framework_extension_point_duration_seconds_count{extension_point="Bind",'
            'profile="default-scheduler",status="Success"} 40',
            "# HELP scheduler_pending_pods [STABLE] Number of pending pods, by the queue type. "
            "'active' means number of pods in activeQ; 'backoff' means number of pods in "
            "backoffQ; 'unschedulable' means number of pods in unschedulablePods that the "
            "scheduler attempted to schedule and failed; 'gated' is the number of unschedulable "
            "pods that the scheduler never attempted to schedule because they are gated.",
            "# TYPE scheduler_pending_pods gauge",
        ]
        lines += [f'scheduler_pending_pods{{queue="{q}"}} {self.pending[q]}' for q in QUEUES]
        lines += [
            "# HELP scheduler_schedule_attempts_total [STABLE] Number of attempts to schedule "
            "pods, by the result.",
            "# TYPE scheduler_schedule_attempts_total counter",
        ]
        lines += [
            f'scheduler_schedule_attempts_total{{profile="default-scheduler",result="{r}"}} '
            f"{self.counts[r][-1]}"
            for r in RESULTS
        ]
        lines += [
            "# HELP scheduler_scheduling_attempt_duration_seconds [STABLE] Scheduling attempt "
            "latency in seconds (scheduling algorithm + binding)",
            "# TYPE scheduler_scheduling_attempt_duration_seconds histogram",
        ]
        name = "scheduler_scheduling_attempt_duration_seconds"
        for r in RESULTS:
            labels = f'profile="default-scheduler",result="{r}"'
            row = self.counts[r]
            for bound, count in zip((*BUCKETS, None), row, strict=True):
                le = "+Inf" if bound is None else _fmt(bound)
                lines.append(f'{name}_bucket{{{labels},le="{le}"}} {count}')
            lines.append(f"{name}_sum{{{labels}}} {_fmt(round(self.sums[r], 6))}")
            lines.append(f"{name}_count{{{labels}}} {row[-1]}")
        return "\n".join(lines) + "\n"

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.authorizations.append(request.headers.get("Authorization"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return web.Response(status=401, text="Unauthorized")
        if self.status != 200:
            return web.Response(status=self.status, text="scheduler unhappy")
        body = self.body_override if self.body_override is not None else self.page().encode()
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    @contextlib.asynccontextmanager
    async def serve(self, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
        """Serve on 127.0.0.1 (an OS-chosen port); yields the metrics URL."""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        try:
            yield f"{scheme}://127.0.0.1:{port}/metrics"
        finally:
            await runner.cleanup()


def clock_at(now: float) -> Any:
    """A settable clock: ``c()`` is ``c.now``."""
    c: Any = lambda: c.now  # noqa: E731
    c.now = now
    return c
