"""The agent's own controller sink and link against the real controller app: bearer token on
every request (re-read after rotation), and backpressure end to end (503 + Retry-After while
the forwarding queue is full: the sink keeps the batch, retries, and nothing is lost)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiohttp
import anyio
import pytest

from tapio import wire
from tapio.agent.controller_client import ControllerClient
from tapio.controller import Controller
from tapio.controller.auth import TokenFile
from tapio.controller.forward import Forwarder, Record
from tapio.controller.metrics import ControllerMetrics
from tapio.sinks.controller import ControllerSink
from tapio.transport import make_link

from ..sinks.conftest import drops, occ, running
from .ctl_harness import capturing_logger
from .ctl_harness import running as serving

TOKEN, ROTATED = "agent-side-token-0123456789", "agent-side-token-rotated-42"


class Gate:
    """A downstream that refuses deliveries until opened."""

    name = "gate"

    def __init__(self) -> None:
        self.open = False
        self.ids: list[str] = []

    async def connect(self) -> None:
        return None

    async def deliver(self, records: Sequence[Record]) -> list[bool]:
        if not self.open:
            raise ConnectionError("gate closed")
        self.ids.extend(r.id for r in records)
        return [True] * len(records)

    async def close(self) -> None:
        return None


def hello_for(agent_id: str, node: str) -> wire.HelloRequest:
    return wire.HelloRequest(
        wire_version=wire.WIRE_VERSION,
        agent_id=agent_id,
        node_name=node,
        tapio_version="0",
        kernel_release="6",
        arch="x86_64",
    )


async def test_token_on_every_request_and_backpressure_without_loss(tmp_path: Path) -> None:
    ctl_token, agent_token = tmp_path / "ctl", tmp_path / "agent"
    ctl_token.write_text(TOKEN)
    agent_token.write_text(TOKEN + "\n")
    log, cap = capturing_logger()
    metrics = ControllerMetrics()
    gate = Gate()
    fwd = Forwarder([gate], metrics, log, queue_max_events=300)
    ctl = Controller(
        logger=log,
        metrics=metrics,
        forwarder=fwd,
        token=TokenFile(ctl_token, check_interval=0.05, logger=log),
    )
    async with serving(ctl) as url:
        link = make_link(url, "node/gw", "gw", token_file=str(agent_token))
        assert TOKEN not in repr(link)
        async with aiohttp.ClientSession() as s:
            client = ControllerClient(link, s)
            answer = await client.hello(hello_for(link.agent_id, link.node_name))
            assert answer.accepted
            assert await client.fetch_config(None) is not None
            # rotation on both sides, no restart
            ctl_token.write_text(ROTATED)
            agent_token.write_text(ROTATED)
            await anyio.sleep(0.1)
            assert await client.fetch_config(None) is not None
        link.registered = True
        link.apply_batching(20, 100)
        sink = ControllerSink(link, max_retries=8, backoff_base=0.05, backoff_max=0.5, timeout=5)
        before = {r: drops("controller", r) for r in ("rejected", "retries_exhausted", "shutdown")}
        async with running(sink, within=30) as send:
            send.send_nowait([occ(i) for i in range(500)])
            with anyio.fail_after(10):
                while metrics.events_refused.labels("queue_full")._value.get() == 0:
                    await anyio.sleep(0.02)
            assert len(fwd.lanes[0]) == 300  # full: the rest is held by the agent
            gate.open = True
            with anyio.fail_after(20):
                while len(set(gate.ids)) < 500:
                    await anyio.sleep(0.05)
    assert sorted(set(gate.ids)) == sorted(gate.ids)  # once each
    assert len(gate.ids) == 500
    assert {r: drops("controller", r) for r in before} == before
    assert metrics.auth_failures.labels("invalid")._value.get() == 0
    assert metrics.auth_failures.labels("missing")._value.get() == 0
    assert ctl.state.totals.accepted_events_total == 500
    st = next(a for a in ctl.status_response().agents if a.agent_id == "node/gw")
    assert st.sequence.regressions_total == 0 and st.sequence.gaps_total == 0
    assert TOKEN not in repr(cap.calls) and ROTATED not in repr(cap.calls)


async def test_agent_without_the_token_gets_401(tmp_path: Path) -> None:
    (tmp_path / "ctl").write_text(TOKEN)
    log, _ = capturing_logger()
    ctl = Controller(logger=log, token=TokenFile(tmp_path / "ctl"))
    async with serving(ctl) as url, aiohttp.ClientSession() as s:
        from tapio.agent.controller_client import ControllerCallError

        client = ControllerClient(make_link(url, "node/x", "x"), s)
        with pytest.raises(ControllerCallError) as err:
            await client.hello(hello_for("node/x", "x"))
        assert "401" in str(err.value) and "UNAUTHORIZED" in str(err.value)
    assert ctl.state.agents == {}


def test_agent_refuses_an_unusable_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tapio.agent.cli import main

    (tmp_path / "t").write_text("")
    argv = ["--sink", "controller", "--controller-endpoint", "http://127.0.0.1:1"]
    assert main([*argv, "--controller-token-file", str(tmp_path / "t")]) == 2
    assert "--controller-token-file" in capsys.readouterr().err
    assert main(["--controller-token-file", str(tmp_path / "t")]) == 2
    assert "requires --controller-endpoint" in capsys.readouterr().err
