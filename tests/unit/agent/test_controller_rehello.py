"""409 UNKNOWN_AGENT: the agent keeps the batch, says hello again and re-sends it.

The real controller app restarts (fresh state, same port) in the middle of a stream: every
occurrence sent before and after the restart is accepted exactly once, nothing is dropped, the
sequence carries on without gap or regression and the re-registration is counted. A controller
that keeps answering 409 does not make the agent spin: attempts and hellos stay bounded and the
batch is finally counted as ``send_failed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from aiohttp import web

from tapio import wire
from tapio.agent.controller_mode import ControllerSession
from tapio.controller import Controller
from tapio.sinks.controller import ControllerSink
from tapio.transport import ControllerLink, make_link

from ..sinks.conftest import Recorded, drops, occ, running, start_receiver
from .test_controller_mode import FakeAgent, fake_agent, sample


@contextlib.asynccontextmanager
async def serve(ctl: Controller, port: int = 0) -> AsyncIterator[int]:
    runner = web.AppRunner(ctl.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def rereg(reason: str) -> float:
    return sample("tapio_controller_reregistrations_total", reason=reason)


def sink_for(link: ControllerLink) -> ControllerSink:
    return ControllerSink(
        link,
        max_retries=3,
        backoff_base=0.05,
        backoff_max=0.2,
        connect_timeout=2.0,
        timeout=2.0,
        shutdown_timeout=2.0,
    )


@contextlib.asynccontextmanager
async def session_running(link: ControllerLink, agent: FakeAgent) -> AsyncIterator[None]:
    # Heartbeats far apart: only the sink's 409 can reveal the restart within the test.
    session = ControllerSession(
        link, poll_interval=60.0, heartbeat_interval=60.0, hello_base=0.05, hello_max=0.2
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(session.run, agent)  # type: ignore[arg-type]
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def wait_accepted(ctl: Controller, n: int, within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while ctl.state.totals.accepted_events_total < n:
            await anyio.sleep(0.02)


async def test_controller_restart_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    reasons = ("buffer_full", "send_failed", "rejected", "shutdown", "too_large")
    before_drops = {r: drops("controller", r) for r in reasons}
    before_rereg = rereg("unknown_agent")
    first, second = Controller(), Controller()
    with anyio.fail_after(40):
        async with contextlib.AsyncExitStack() as outer:
            srv1 = contextlib.AsyncExitStack()
            outer.push_async_callback(srv1.aclose)  # closed even when the test fails early
            port = await srv1.enter_async_context(serve(first))
            link2 = make_link(f"http://127.0.0.1:{port}", "node/rehello2", "rehello2")
            await outer.enter_async_context(session_running(link2, fake_agent(tmp_path)))
            sink2 = sink_for(link2)
            send2 = await outer.enter_async_context(running(sink2, within=35))
            send2.send_nowait([occ(i) for i in range(300)])
            await wait_accepted(first, 300)
            # The last answer is read too (else the restart could cut it and the retry would
            # legitimately deliver that batch twice, once per controller).
            with anyio.fail_after(5):
                while sink2.held:
                    await anyio.sleep(0.01)
            # Restart: the old controller goes away, a fresh one (no agents) takes the port.
            await srv1.aclose()
            await outer.enter_async_context(serve(second, port))
            send2.send_nowait([occ(1000 + i) for i in range(200)])
            await wait_accepted(second, 200)
            send2.send_nowait([occ(2000 + i) for i in range(10)])
            await wait_accepted(second, 210)
            st = next(a for a in second.status_response().agents if a.agent_id == "node/rehello2")
            seqs = list(sink2.delivered_sequences)
    assert first.state.totals.accepted_events_total == 300
    assert second.state.totals.accepted_events_total == 210  # exactly once each
    assert second.state.totals.batches_rejected_total == 0
    assert (st.sequence.gaps_total, st.sequence.regressions_total) == (0, 0)
    # The batch refused with 409 kept its sequence; the fresh registration took it as baseline.
    assert seqs == list(range(1, len(seqs) + 1))
    assert st.sequence.last_seen == seqs[-1]
    for r in reasons:
        assert drops("controller", r) == before_drops[r], r
    assert rereg("unknown_agent") - before_rereg == 1
    assert sink2.healthy


def hello_answer() -> bytes:
    return wire.encode(
        wire.HelloResponse(
            wire_version=wire.WIRE_VERSION,
            accepted=True,
            controller_id="amnesiac",
            config_version="1",
            send_interval_ms=20,
            max_batch_events=256,
        )
    )


UNKNOWN = wire.encode(
    wire.WireError(
        409, "UNKNOWN_AGENT", "agent is not registered; POST /v1/agents/hello first"
    ).envelope()
)


def amnesiac(n: int, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
    """Accepts every hello, forgets the agent at once: every batch gets 409 UNKNOWN_AGENT."""
    json = {"Content-Type": "application/json"}
    if rec.path == "/v1/agents/hello":
        return 200, json, hello_answer()
    if rec.path == "/v1/events":
        return 409, json, UNKNOWN
    return 503, json, b"{}"


async def test_a_controller_that_keeps_answering_409_is_bounded(tmp_path: Path) -> None:
    before_failed = drops("controller", "send_failed")
    before_rejected = drops("controller", "rejected")
    before_rereg = rereg("unknown_agent")
    async with start_receiver(amnesiac) as rx:
        link = make_link(rx.url, "node/amnesia", "amnesia")
        async with session_running(link, fake_agent(tmp_path)):
            sink = sink_for(link)
            async with running(sink, within=30) as send:
                send.send_nowait([occ(i) for i in range(5)])
                with anyio.fail_after(20):
                    while drops("controller", "send_failed") - before_failed < 5:
                        await anyio.sleep(0.05)
                await anyio.sleep(1.0)  # nothing more happens once the batch is given up
    events = [r for r in rx.requests if r.path == "/v1/events"]
    hellos = [r for r in rx.requests if r.path == "/v1/agents/hello"]
    # One batch, its retry budget (1 + 3 attempts), all with the same sequence; then counted.
    assert len(events) == 4
    assert {wire.decode(r.body, wire.EventBatchRequest).sequence for r in events} == {1}
    assert drops("controller", "send_failed") - before_failed == 5
    assert drops("controller", "rejected") == before_rejected
    # Re-registration is rate-limited: at most one hello per second of 409s after the first.
    span = events[-1].at - events[0].at
    assert 1 <= len(hellos) <= 2 + int(span / 1.0) + 1
    assert 0 < rereg("unknown_agent") - before_rereg <= len(hellos) - 1
    assert not sink.healthy
