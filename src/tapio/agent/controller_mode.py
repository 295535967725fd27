"""Agent controller mode (docs/wire.md "Agent controller mode").

``controller_service(args)`` returns the service the agent runs in its task group when
``--controller-endpoint`` is given; ``make_controller_sink(args)`` builds ``--sink controller``.
Both share one :class:`~tapio.transport.ControllerLink` per endpoint (identity and the
hello-derived batching).

The service:

* **hello** until accepted, with jittered exponential backoff (1 s doubling to 60 s), carrying
  the agent's version, kernel release, arch, capabilities and the loaded objects' sizes and map
  counts;
* **config poll** every ``--config-poll-interval`` (first one right after registration), with
  ``If-None-Match``; a new config is decoded, validated, its hash verified, mapped to the kernel
  ``tapio_config`` + userspace thresholds (``kconfig.from_compiled``) and written to every carrier
  (no reload); errors back off with jitter; outcomes counted in ``tapio_config_fetch_total``;
* **heartbeat** every ``--heartbeat-interval`` with the *applied* generation and hash, observer
  states from the actual load/attach results, degraded reasons and counters; ``accepted: false``
  (the controller does not know us, e.g. it restarted) sends the agent back to hello;
* **re-hello on demand**: a ``409 UNKNOWN_AGENT`` answer to an event batch (a restarted
  controller, another replica) makes the sink call ``ControllerLink.request_rehello`` (at most
  once a second), which wakes the registration loop here: the same hello path, one session.
  Every accepted hello after the first counts ``tapio_controller_reregistrations_total{reason}``
  (``unknown_agent`` from the sink, ``heartbeat_not_accepted`` from a heartbeat).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
import structlog

from tapio import __version__, wire
from tapio.agent.controller_client import (
    ControllerCallError,
    ControllerClient,
    FetchedConfig,
    arch,
    identity_from_env,
    kernel_release,
)
from tapio.agent.kconfig import from_compiled
from tapio.bpf.abi import OBSERVER_FLAGS, TAPIO_CONFIG_ABI_VERSION
from tapio.metrics import (
    CONFIG_FETCH,
    CONTROLLER_REREGISTRATIONS,
    CONTROLLER_SEND_FAILURES,
    CORRELATION_DROPS,
    EVENTS,
    LOST_EVENTS,
    MALFORMED_EVENTS,
    SINK_DROPS,
)
from tapio.profile.compiled import config_hash
from tapio.sinks.base import Sink
from tapio.sinks.controller import ControllerSink
from tapio.transport import ControllerLink, backoff_delay, make_link

if TYPE_CHECKING:
    import aiohttp
    from prometheus_client import Counter

    from tapio.agent.runtime import Agent

log = structlog.get_logger("tapio.agent.controller")
_Answer = TypeVar("_Answer")

HELLO_BACKOFF_BASE: Final = 1.0
HELLO_BACKOFF_MAX: Final = 60.0
POLL_BACKOFF_MAX: Final = 60.0
HEARTBEAT_OBSERVERS: Final = ("network", "storage", "container", "node")

#: Observer-level degraded reasons -> the wire's names (others are sent as ``unknown``).
REASON_MAP: Final = {
    "abi_mismatch": wire.DegradedReason.CONFIG_ABI_MISMATCH,
    "no_pmu": wire.DegradedReason.PMC_UNSUPPORTED,
}

_LINKS: dict[str, ControllerLink] = {}


def link_for(args: argparse.Namespace) -> ControllerLink:
    """The shared link for ``args.controller_endpoint`` (created on first use)."""
    endpoint = str(args.controller_endpoint).strip()
    link = _LINKS.get(endpoint)
    if link is None:
        ident = identity_from_env()
        link = make_link(
            endpoint,
            ident.agent_id,
            ident.node_name,
            getattr(args, "controller_ca_file", None),
            getattr(args, "controller_token_file", None),
        )
        _LINKS[endpoint] = link
    return link


def make_controller_sink(args: argparse.Namespace) -> Sink:
    return ControllerSink(link_for(args))


def controller_service(args: argparse.Namespace) -> Callable[[Agent], Awaitable[None]]:
    link = link_for(args)
    poll = float(args.config_poll_interval)
    heartbeat = float(args.heartbeat_interval)

    async def service(agent: Agent) -> None:
        await ControllerSession(link, poll_interval=poll, heartbeat_interval=heartbeat).run(agent)

    return service


@dataclass
class Applied:
    version: str
    generation: int
    config_hash: str
    flags: int


def _sum(counter: Counter) -> int:
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return int(total)


def counters() -> wire.AgentCounters:
    """Sums over every label set of the agent's counters, as the heartbeat reports them."""
    return wire.AgentCounters(
        events_total=_sum(EVENTS),
        malformed_events_total=_sum(MALFORMED_EVENTS),
        lost_events_total=_sum(LOST_EVENTS),
        correlation_drops_total=_sum(CORRELATION_DROPS),
        sink_drops_total=_sum(SINK_DROPS),
        controller_send_failures_total=_sum(CONTROLLER_SEND_FAILURES),
    )


def verify_hash(fetched: FetchedConfig) -> str | None:
    """None when ``config_hash`` matches the served config, else why not.

    The hash matches when it is the SHA-256 of the ``config`` bytes as served (the canonical
    JSON of any conforming controller, including one newer than us whose extra knobs we do not
    decode), or of our own canonical encoding of the decoded config.
    """
    claimed = fetched.response.config_hash.strip()
    if not claimed:
        return "empty config_hash"
    if "sha256:" + hashlib.sha256(fetched.raw_config).hexdigest() == claimed:
        return None
    ours = config_hash(fetched.response.config)
    if ours == claimed:
        return None
    return f"config_hash {claimed} does not match the served config ({ours})"


async def _call(kind: str, request: Awaitable[_Answer]) -> _Answer | None:
    """One hello or heartbeat call; a failed call is counted by ``kind`` and logged, and
    gives None (the caller's loop decides when to try again)."""
    try:
        return await request
    except ControllerCallError as exc:
        CONTROLLER_SEND_FAILURES.labels(kind=kind).inc()
        log.warning(f"controller {kind} failed", error=str(exc))
        return None


@dataclass
class ControllerSession:
    link: ControllerLink
    poll_interval: float
    heartbeat_interval: float
    hello_base: float = HELLO_BACKOFF_BASE
    hello_max: float = HELLO_BACKOFF_MAX
    poll_backoff_max: float = POLL_BACKOFF_MAX
    connect_timeout: float = 5.0
    timeout: float = 10.0
    kubernetes: bool | None = None
    applied: Applied | None = None
    etag: str | None = None
    #: Observers whose carrier write failed during the last fan-out (reported degraded).
    fanout_failed: set[str] = field(default_factory=set)
    registrations: int = 0
    last_hello: wire.HelloResponse | None = None
    _started: float = field(default_factory=time.monotonic)
    _registered: anyio.Event | None = None
    _poll_now: anyio.Event | None = None
    _need_hello: bool = True

    # ---- messages ---------------------------------------------------------------------------

    def hello_request(self, agent: Agent) -> wire.HelloRequest:
        caps: list[str] = [f"config_abi_v{TAPIO_CONFIG_ABI_VERSION}"]
        sizes: dict[str, int] = {}
        maps: dict[str, int] = {}
        for ro in agent.observers:
            if ro.state != "running" or ro.obj is None:
                continue
            caps.append(f"observer.{ro.name}")
            for cap in ro.observer.capabilities():
                if cap.available:
                    caps.append(f"{ro.name}.{cap.name}")
            with contextlib.suppress(OSError):
                sizes[ro.obj.path.name] = ro.obj.path.stat().st_size
            maps[ro.obj.path.name] = len(ro.obj.maps)
        return wire.HelloRequest(
            wire_version=wire.WIRE_VERSION,
            agent_id=self.link.agent_id,
            node_name=self.link.node_name,
            tapio_version=__version__,
            kernel_release=kernel_release(),
            arch=arch(),
            capabilities=caps,
            object_sizes=sizes,
            map_counts=maps,
        )

    def observer_states(self, agent: Agent) -> dict[str, wire.ObserverStatus]:
        flags = self.applied.flags if self.applied is not None else 0
        loaded = {ro.name: ro for ro in agent.observers}
        out: dict[str, wire.ObserverStatus] = {}
        names = list(HEARTBEAT_OBSERVERS) + [n for n in loaded if n not in HEARTBEAT_OBSERVERS]
        for name in names:
            ro = loaded.get(name)
            if ro is None:
                out[name] = wire.ObserverStatus.DISABLED
            elif ro.state == "failed":
                out[name] = wire.ObserverStatus.FAILED
            elif not flags & OBSERVER_FLAGS.get(name, 0):
                out[name] = wire.ObserverStatus.DISABLED
            elif ro.observer.degraded_reasons or name in self.fanout_failed:
                out[name] = wire.ObserverStatus.DEGRADED
            else:
                out[name] = wire.ObserverStatus.RUNNING
        return out

    def degraded_reasons(
        self, agent: Agent, states: dict[str, wire.ObserverStatus]
    ) -> list[wire.DegradedReason]:
        reasons: list[wire.DegradedReason] = []

        def add(reason: wire.DegradedReason) -> None:
            if reason not in reasons:
                reasons.append(reason)

        if self.applied is None:
            add(wire.DegradedReason.UNCONFIGURED)
        for ro in agent.observers:
            if ro.state == "failed" or ro.name in self.fanout_failed:
                add(wire.DegradedReason.OBSERVER_FAILED)
            if states.get(ro.name) != wire.ObserverStatus.DEGRADED:
                continue  # disabled observers' reasons do not degrade the node
            for text in ro.observer.degraded_reasons:
                add(
                    REASON_MAP.get(text)
                    or (
                        wire.DegradedReason.KERNEL_UNSUPPORTED
                        if text.startswith("no_")
                        else wire.DegradedReason.UNKNOWN
                    )
                )
        for sink in agent.sinks:
            healthy = getattr(sink, "healthy", True)
            if healthy is False:
                add(wire.DegradedReason.SINK_FAILING)
        return reasons

    def heartbeat_request(self, agent: Agent) -> wire.HeartbeatRequest:
        states = self.observer_states(agent)
        return wire.HeartbeatRequest(
            wire_version=wire.WIRE_VERSION,
            agent_id=self.link.agent_id,
            node_name=self.link.node_name,
            config_version=self.applied.version if self.applied is not None else "0",
            config_hash=self.applied.config_hash if self.applied is not None else "",
            uptime_seconds=int(time.monotonic() - self._started),
            observers=states,
            counters=counters(),
            degraded_reasons=self.degraded_reasons(agent, states),
        )

    # ---- one step each (the loops below add timing) -------------------------------------------

    async def hello_once(self, client: ControllerClient, agent: Agent) -> bool:
        answer = await _call("hello", client.hello(self.hello_request(agent)))
        if answer is None:
            return False
        if not answer.accepted:
            CONTROLLER_SEND_FAILURES.labels(kind="hello").inc()
            log.warning("controller hello not accepted", controller_id=answer.controller_id)
            return False
        self.link.apply_batching(answer.send_interval_ms, answer.max_batch_events)
        if self.registrations:
            reason = self.link.rehello_reason or "heartbeat_not_accepted"
            CONTROLLER_REREGISTRATIONS.labels(reason=reason).inc()
        self.link.rehello_reason = None
        self.link.registered = True
        self.last_hello = answer
        self.registrations += 1
        self._need_hello = False
        log.info(
            "controller hello accepted",
            controller_id=answer.controller_id,
            config_version=answer.config_version,
            agent_id=self.link.agent_id,
            max_batch_events=self.link.max_batch_events,
            send_interval_ms=self.link.send_interval_ms,
        )
        if self.applied is None or answer.config_version != self.applied.version:
            # A restarted or reloaded controller: fetch now, without the ETag shortcut, so the
            # generation we stamp follows the controller's even when the hash is unchanged.
            self.etag = None
        if self._poll_now is not None:
            self._poll_now.set()
        if self._registered is not None:
            self._registered.set()
        return True

    async def poll_once(self, client: ControllerClient, agent: Agent) -> str:
        """One config poll; returns the ``tapio_config_fetch_total`` result it counted."""
        try:
            fetched = await client.fetch_config(self.etag)
        except ControllerCallError as exc:
            result = "rejected" if exc.kind == "invalid" else "error"
            CONFIG_FETCH.labels(result=result).inc()
            log.warning("config poll failed", result=result, error=str(exc))
            return result
        if fetched is None:
            CONFIG_FETCH.labels(result="not_modified").inc()
            return "not_modified"
        resp = fetched.response
        try:
            resp.validate()
            generation = resp.generation()
        except wire.WireError as exc:
            CONFIG_FETCH.labels(result="rejected").inc()
            log.error("controller config rejected", error=exc.message, version=resp.version)
            return "rejected"
        problem = verify_hash(fetched)
        if problem is not None:
            CONFIG_FETCH.labels(result="rejected").inc()
            log.error("controller config rejected", error=problem, version=resp.version)
            return "rejected"
        kernel, user = from_compiled(resp.config, generation, kubernetes=self.kubernetes)
        failed = agent.apply_config(kernel, user)
        self.fanout_failed = set(failed)
        self.applied = Applied(
            version=resp.version.strip(),
            generation=generation,
            config_hash=resp.config_hash.strip(),
            flags=kernel.flags,
        )
        self.etag = fetched.etag or f'"{self.applied.config_hash}"'
        CONFIG_FETCH.labels(result="applied").inc()
        log.info(
            "config applied",
            version=self.applied.version,
            config_hash=self.applied.config_hash,
            flags=kernel.flags,
            failed_observers=sorted(failed) or None,
        )
        return "applied"

    async def heartbeat_once(self, client: ControllerClient, agent: Agent) -> bool | None:
        """True accepted, False not accepted (re-hello needed), None on failure."""
        answer = await _call("heartbeat", client.heartbeat(self.heartbeat_request(agent)))
        if answer is None:
            return None
        if not answer.accepted:
            CONTROLLER_SEND_FAILURES.labels(kind="heartbeat").inc()
            log.warning("controller does not know this agent; registering again")
            self._need_hello = True
            self.link.registered = False
            if self.link.rehello_reason is None:
                self.link.rehello_reason = "heartbeat_not_accepted"
            return False
        if self.applied is not None and answer.next_config_version != self.applied.version:
            log.debug("controller has another config version", next=answer.next_config_version)
        return True

    # ---- loops ------------------------------------------------------------------------------

    async def _register(self, client: ControllerClient, agent: Agent) -> None:
        attempt = 0
        while not await self.hello_once(client, agent):
            await anyio.sleep(backoff_delay(attempt, self.hello_base, self.hello_max))
            attempt += 1

    async def _registration_loop(self, client: ControllerClient, agent: Agent) -> None:
        while True:
            if self._need_hello or self.link.rehello_reason is not None:
                if not self._need_hello:
                    log.warning(
                        "controller does not know this agent; registering again",
                        reason=self.link.rehello_reason,
                    )
                self._need_hello = True
                await self._register(client, agent)
            await self.heartbeat_once(client, agent)
            if self._need_hello:
                continue  # accepted: false -> hello again right away (then back off)
            # Woken early when the sink got 409 UNKNOWN_AGENT (the link rate-limits that).
            await self.link.wait_rehello(self.heartbeat_interval)

    async def _poll_loop(self, client: ControllerClient, agent: Agent) -> None:
        assert self._registered is not None
        await self._registered.wait()
        errors = 0
        while True:
            self._poll_now = anyio.Event()
            result = await self.poll_once(client, agent)
            if result in ("applied", "not_modified"):
                errors = 0
                delay = self.poll_interval
            else:
                delay = backoff_delay(
                    errors, self.poll_interval, max(self.poll_backoff_max, self.poll_interval)
                )
                errors += 1
            with anyio.move_on_after(delay):
                await self._poll_now.wait()
                errors = 0

    def http_session(self) -> aiohttp.ClientSession:
        """The session of the hello, poll and heartbeat requests (this link's TLS)."""
        return self.link.session(connect_timeout=self.connect_timeout, timeout=self.timeout)

    async def run(self, agent: Agent) -> None:
        self._registered = anyio.Event()
        self._poll_now = anyio.Event()
        self._started = time.monotonic()
        log.info(
            "controller mode",
            endpoint=str(self.link.endpoint),
            agent_id=self.link.agent_id,
            node_name=self.link.node_name,
        )
        session = self.http_session()
        try:
            client = ControllerClient(self.link, session)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._registration_loop, client, agent)
                tg.start_soon(self._poll_loop, client, agent)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await session.close()


__all__ = [
    "Applied",
    "ControllerSession",
    "controller_service",
    "counters",
    "link_for",
    "make_controller_sink",
    "verify_hash",
]
