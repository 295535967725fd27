"""The tapio-wire/v1 controller as an aiohttp application.

Request discipline, in order: the bearer token on ``/v1/*`` when one is configured (401, before
anything else is looked at), route and method (404/405 with the JSON envelope, ``Allow`` kept),
``Content-Type: application/json`` on POST bodies, the 262144-byte body limit (checked against
Content-Length before reading, then while reading, so a liar cannot stream more), JSON decoding
into the wire Struct (any failure is ``MALFORMED_JSON``), then ``validate()``. State is touched
only after all of that passed. Every error, including the router's and unexpected exceptions,
leaves as ``{"error":{"code","message"}}``.

Events are accepted only from agents that said hello (409 ``UNKNOWN_AGENT`` otherwise) and,
with ``--forward``, only once the whole batch sits in every output's bounded queue (503 with
``Retry-After`` when it does not fit, so the agent keeps the batch and retries). Accepted
occurrences, enriched, also enter the bounded evidence window that ``GET /v1/evidence`` and the
MCP endpoint ``/mcp`` read; with ``--scheduler-metrics-url`` the controller's own scheduler
occurrences take the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tapio import wire
from tapio.controller.auth import TokenFile, is_protected, unauthorized
from tapio.controller.batch import decode_batch
from tapio.controller.config import ActiveConfig, ConfigStore, ReloadOutcome, ReloadResult
from tapio.controller.evidence import EvidenceWindow, evidence_response
from tapio.controller.forward import Forwarder, Record, ingest_records
from tapio.controller.forward.engine import RETRY_AFTER_SECONDS
from tapio.controller.httputil import (
    CODES_BY_STATUS,
    JSON_CONTENT_TYPE,
    error_response,
    if_none_match,
    json_response,
    read_json_body,
)
from tapio.controller.k8s import Enricher
from tapio.controller.mcp_http import McpEndpoint
from tapio.controller.metrics import ControllerMetrics
from tapio.controller.state import ControllerState
from tapio.profile import ProfileError

if TYPE_CHECKING:  # kubernetes_asyncio is imported only when --kubernetes is used
    from tapio.controller.k8s.watch import PodWatcher
    from tapio.controller.scheduler import SchedulerMonitor

CONTROLLER_ID: Final = "tapio-controller/default"
DEFAULT_MAX_AGENTS: Final = 10_000
DEFAULT_STALE_AFTER: Final = 90.0
RELOAD_POLL_SECONDS: Final = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Controller:
    """State, config and metrics of one controller, and the aiohttp app serving them."""

    def __init__(
        self,
        *,
        profile_path: str | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        max_agents: int = DEFAULT_MAX_AGENTS,
        reload_poll_seconds: float = RELOAD_POLL_SECONDS,
        logger: Any = None,
        token: TokenFile | None = None,
        metrics: ControllerMetrics | None = None,
        forwarder: Forwarder | None = None,
        pod_watcher: PodWatcher | None = None,
        window: EvidenceWindow | None = None,
        scheduler: SchedulerMonitor | None = None,
    ) -> None:
        self.log = logger if logger is not None else structlog.get_logger("tapio.controller")
        self.token = token
        self.forwarder = forwarder
        self.pod_watcher = pod_watcher
        self.config = ConfigStore(profile_path)
        self.state = ControllerState(max_agents=max_agents, stale_after=stale_after)
        self.metrics = metrics if metrics is not None else ControllerMetrics()
        self.enrich = Enricher(pod_watcher.index, self.metrics) if pod_watcher is not None else None
        self.window = window if window is not None else EvidenceWindow(metrics=self.metrics)
        self.scheduler = scheduler
        self.mcp = McpEndpoint(self.window, logger=self.log)
        self.metrics.config_generation.set(self.config.active.generation)
        self.started_at_unix = int(time.time())
        self.reload_poll_seconds = reload_poll_seconds
        self._last_reload_failure = ""
        self._reload_lock = asyncio.Lock()

    @property
    def active(self) -> ActiveConfig:
        return self.config.active

    # -- app -----------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        # Our own reader enforces the body limit; aiohttp's is set above it so it never answers
        # first with its plain-text 413.
        app = web.Application(
            middlewares=[self._error_middleware], client_max_size=wire.MAX_BODY_BYTES * 2
        )
        app.router.add_post("/v1/agents/hello", self.hello)
        app.router.add_get("/v1/agents/config", self.get_config)
        app.router.add_post("/v1/agents/heartbeat", self.heartbeat)
        app.router.add_post("/v1/events", self.events)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/evidence", self.evidence)
        self.mcp.add_routes(app)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self.config.profile_path is not None:
            app.cleanup_ctx.append(self._profile_watcher)
        if self.forwarder is not None:
            app.cleanup_ctx.append(self._forwarding)
        if self.pod_watcher is not None:
            app.cleanup_ctx.append(self._kubernetes)
        if self.scheduler is not None:
            app.cleanup_ctx.append(self._scheduling)
        return app

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            if self.token is not None and is_protected(request.path):
                refusal = self.token.verify(request.headers.get("Authorization"))
                if refusal is not None:
                    self.metrics.auth_failures.labels(refusal).inc()
                    raise unauthorized(f"{refusal} bearer token")
            response = await handler(request)
        except wire.WireError as err:
            self.log.debug("request rejected", path=request.path, code=err.code, reason=err.message)
            extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            response = error_response(err, extra)
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            response = error_response(
                wire.WireError.method_not_allowed(request.method, allowed), {"Allow": allowed}
            )
        except web.HTTPNotFound:
            response = error_response(wire.WireError.unknown_endpoint())
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = CODES_BY_STATUS.get(
                exc.status, "INTERNAL_ERROR" if exc.status >= 500 else "BAD_REQUEST"
            )
            response = error_response(wire.WireError(exc.status, code, exc.reason))
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("unhandled error", path=request.path, method=request.method)
            response = error_response(wire.WireError.internal())
        route = request.match_info.route.resource
        template = route.canonical if route is not None else "unmatched"
        self.metrics.requests.labels(template, str(response.status)).inc()
        return response

    # -- handlers ------------------------------------------------------------------------------

    async def hello(self, request: web.Request) -> web.Response:
        msg = wire.decode(await read_json_body(request), wire.HelloRequest)
        msg.validate()
        result = self.state.register(msg, now_unix=int(time.time()), now_mono=time.monotonic())
        if not result.accepted:
            self.metrics.hellos.labels("capacity").inc()
            self.log.warning("registration refused: agent capacity reached", agent_id=msg.agent_id)
            return error_response(
                wire.WireError(503, "CAPACITY_EXCEEDED", "controller agent capacity reached"),
                {"Retry-After": "30"},
            )
        if result.evicted is not None:
            self.metrics.agents_evicted.inc()
            self.log.info("stale agent evicted", agent_id=result.evicted)
        self.metrics.hellos.labels("accepted").inc()
        self.log.info("agent registered", agent_id=msg.agent_id, node_name=msg.node_name)
        active = self.active
        return json_response(
            wire.HelloResponse(
                wire_version=wire.WIRE_VERSION,
                accepted=True,
                controller_id=CONTROLLER_ID,
                config_version=active.version,
                send_interval_ms=active.batching.send_interval_ms,
                max_batch_events=active.batching.max_batch_events,
            )
        )

    async def get_config(self, request: web.Request) -> web.Response:
        for name in ("agent_id", "node_name"):
            if not request.query.get(name, "").strip():
                raise wire.WireError.missing_field(name)
        active = self.active
        headers = {"ETag": active.etag}
        if if_none_match(request.headers.get("If-None-Match"), active.etag):
            self.metrics.config_polls.labels("not_modified").inc()
            return web.Response(status=304, headers=headers)
        self.metrics.config_polls.labels("served").inc()
        return web.Response(
            body=active.response_body, content_type=JSON_CONTENT_TYPE, headers=headers
        )

    async def heartbeat(self, request: web.Request) -> web.Response:
        msg = wire.decode(await read_json_body(request), wire.HeartbeatRequest)
        msg.validate()
        accepted = self.state.heartbeat(msg, now_mono=time.monotonic())
        self.metrics.heartbeats.labels("accepted" if accepted else "unknown_agent").inc()
        if not accepted:
            self.log.info("heartbeat from unregistered agent", agent_id=msg.agent_id)
        return json_response(
            wire.HeartbeatResponse(
                wire_version=wire.WIRE_VERSION,
                accepted=accepted,
                next_config_version=self.active.version,
            )
        )

    async def events(self, request: web.Request) -> web.Response:
        body = await read_json_body(request)
        batch = decode_batch(body, facts=self.enrich is not None)
        active = self.active
        try:
            batch.validate(active.batching.max_batch_events)
        except wire.WireError:
            self.state.reject_batch(len(batch.events))
            self.metrics.events_rejected.inc(len(batch.events))
            self.metrics.batches.labels("rejected").inc()
            raise
        count = len(batch.events)
        if batch.agent_id not in self.state.agents:
            self.metrics.events_refused.labels("unknown_agent").inc(count)
            self.metrics.batches.labels("unknown_agent").inc()
            raise wire.WireError(
                409, "UNKNOWN_AGENT", "agent is not registered; POST /v1/agents/hello first"
            )
        if not self.emit(ingest_records(batch, body, self.enrich)):
            self.metrics.events_refused.labels("queue_full").inc(count)
            self.metrics.batches.labels("queue_full").inc()
            return error_response(
                wire.WireError(503, "QUEUE_FULL", "forwarding queue full; retry later"),
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        gap, regression = self.state.accept_batch(batch)
        self.metrics.events_accepted.inc(count)
        self.metrics.batches.labels("accepted").inc()
        if gap:
            self.metrics.sequence_gaps.inc(gap)
        if regression:
            self.metrics.sequence_regressions.inc()
        return json_response(
            wire.EventBatchResponse(
                wire_version=wire.WIRE_VERSION,
                accepted=count,
                rejected=0,
                next_config_version=active.version,
            )
        )

    def emit(self, records: Sequence[Record]) -> bool:
        """Into every output's queue and the evidence window, or nowhere (False: queue full).
        The agents' batches and the scheduler judges' occurrences both come through here."""
        if self.forwarder is not None and not self.forwarder.offer(records):
            return False
        self.window.add(records)
        return True

    async def evidence(self, request: web.Request) -> web.Response:
        return json_response(evidence_response(self.window, request.query))

    def status_response(self) -> wire.StatusResponse:
        now = time.monotonic()
        active = self.active
        totals = self.state.totals
        return wire.StatusResponse(
            wire_version=wire.WIRE_VERSION,
            controller_id=CONTROLLER_ID,
            started_at_unix=self.started_at_unix,
            config=wire.StatusConfig(version=active.version, config_hash=active.config_hash),
            totals=wire.StatusTotals(
                accepted_events_total=totals.accepted_events_total,
                rejected_events_total=totals.rejected_events_total,
                batches_accepted_total=totals.batches_accepted_total,
                batches_rejected_total=totals.batches_rejected_total,
            ),
            agents=self.state.agent_statuses(now),
            stale_agents=self.state.stale_agents(now),
            unconverged_agents=self.state.unconverged_agents(active.config_hash),
        )

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self.status_response())

    async def prometheus(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        m = self.metrics
        m.agents.set(len(self.state.agents))
        m.stale_agents.set(len(self.state.stale_agents(now)))
        m.unconverged_agents.set(len(self.state.unconverged_agents(self.active.config_hash)))
        m.config_generation.set(self.active.generation)
        response = web.Response(body=generate_latest(m.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON_CONTENT_TYPE)

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when every output's last connect or delivery succeeded (always, without
        outputs): a controller that cannot forward should not get new agents' traffic."""
        outputs = self.forwarder.reachability() if self.forwarder is not None else {}
        ready = all(outputs.values())
        body: dict[str, Any] = {"outputs": outputs}
        if self.pod_watcher is not None:
            body["kubernetes_synced"] = self.pod_watcher.synced
            ready = ready and self.pod_watcher.synced
        if self.scheduler is not None:  # detail only: a scheduler outage is not ours
            body["scheduler"] = self.scheduler.health()
        body["status"] = "ready" if ready else "not_ready"
        return json_response(body, status=200 if ready else 503)

    async def _forwarding(self, app: web.Application) -> AsyncIterator[None]:
        assert self.forwarder is not None
        self.forwarder.start()
        yield
        # Runs after the listening sockets closed: no new batch can arrive while draining.
        pending = self.forwarder.pending()
        if pending:
            self.log.info("draining forwarding queue", pending=pending)
        await self.forwarder.drain()

    async def _scheduling(self, app: web.Application) -> AsyncIterator[None]:
        assert self.scheduler is not None
        task = asyncio.get_running_loop().create_task(
            self.scheduler.run(lambda: self.active.scheduler, self.emit)
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _kubernetes(self, app: web.Application) -> AsyncIterator[None]:
        assert self.pod_watcher is not None
        task = asyncio.get_running_loop().create_task(self.pod_watcher.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- profile reload ------------------------------------------------------------------------

    def _record_reload(self, outcome: ReloadOutcome, trigger: str) -> None:
        self.metrics.reloads.labels(outcome.result.value).inc()
        active = self.active
        # Every reload line says what triggered it and which generation is served afterwards.
        log = self.log.bind(trigger=trigger, generation=active.generation)
        if outcome.result is ReloadResult.APPLIED:
            self._last_reload_failure = ""
            self.metrics.config_generation.set(active.generation)
            log.info(
                "profile reloaded",
                config_hash=active.config_hash,
                previous_hash=outcome.previous_hash,
            )
        elif outcome.result is ReloadResult.FAILED:
            if outcome.reason != self._last_reload_failure or trigger == "sighup":
                log.error(
                    "profile rejected; keeping the previous config",
                    reason=outcome.reason,
                    config_hash=active.config_hash,
                )
            self._last_reload_failure = outcome.reason
        elif trigger == "sighup":
            log.info("profile unchanged")

    async def reload(self, *, force: bool, trigger: str = "manual") -> ReloadOutcome:
        """Re-read the profile (file I/O off the event loop) and apply it if it changed."""
        async with self._reload_lock:
            try:
                source: bytes | ProfileError = await asyncio.to_thread(self.config.read_source)
            except ProfileError as exc:
                source = exc
            outcome = self.config.apply_source(source, force=force)
            self._record_reload(outcome, trigger)
            return outcome

    def request_reload(self, trigger: str = "sighup") -> asyncio.Task[ReloadOutcome]:
        """Schedule a forced reload; what the SIGHUP handler calls."""
        return asyncio.get_running_loop().create_task(self.reload(force=True, trigger=trigger))

    async def _profile_watcher(self, app: web.Application) -> AsyncIterator[None]:
        async def poll() -> None:
            while True:
                await asyncio.sleep(self.reload_poll_seconds)
                try:
                    await self.reload(force=False, trigger="poll")
                except Exception:  # keep polling whatever happened
                    self.log.exception("profile poll failed")

        task = asyncio.get_running_loop().create_task(poll())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
