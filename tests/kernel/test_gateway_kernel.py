"""Real agent → real controller → real nats-server (JetStream): the cluster evidence path.

50 refused connects become exactly 50 JetStream messages with the right subject, ``dst_port``
and ``pid``; nats-server stopped for 10 s while 50 more are refused, then started again, gives
those 50 as well, each exactly once, with zero drops on the agent and on the controller.

Both processes authenticate with a bearer token from a file (the agent finds its file through
``TAPIO_CONTROLLER_TOKEN_FILE``); the token is rotated between the two phases without a restart,
and neither process ever writes either token to its logs. The controller also forwards to a
``file://`` output, which holds the same occurrences once each.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ..ports import closed_port, reported_port
from ..unit.controller.nats_harness import NatsServer, stream_messages
from .harness import AgentProcess, require_kernel, wait_until

pytestmark = pytest.mark.kernel

CLIENTS = str(Path(__file__).with_name("net_clients.py"))
SUBJECT = "tapio.evidence.kernel.network.connection_refused"


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel(("network",))


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def refuse_from_child(port: int, count: int) -> int:
    """``count`` refused connects from a child process; returns its pid."""
    proc = subprocess.Popen(
        [sys.executable, CLIENTS, "refuse", "tapio-gwrefuse", "127.0.0.1", str(port), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == str(count)
    return proc.pid


def ours(url: str, port: int) -> list[Any]:
    msgs = asyncio.run(stream_messages(url))
    out = []
    for m in msgs:
        assert m.data is not None, m
        if json.loads(m.data)["data"].get("dst_port") == port:
            out.append(m)
    return out


def test_agent_controller_nats_50_then_outage_50_exactly_once(tmp_path: Path) -> None:
    nats_server = NatsServer(tmp_path / "js")
    nats_server.start()
    ctl_log = tmp_path / "controller.log"
    token_1, token_2 = "gw-token-" + "a1" * 16, "gw-token-" + "b2" * 16
    ctl_token, agent_token = tmp_path / "ctl-token", tmp_path / "agent-token"
    for f in (ctl_token, agent_token):
        f.write_text(token_1 + "\n")
    agent: AgentProcess | None = None
    with open(ctl_log, "wb") as log:
        ctl = subprocess.Popen(
            [
                *(sys.executable, "-m", "tapio", "controller", "127.0.0.1:0"),
                *("--forward", nats_server.url, "--log-format", "json"),
                *("--forward", f"file://{tmp_path / 'evidence'}"),
                *("--agent-token-file", str(ctl_token), "--log-level", "debug"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ctl_url = f"http://127.0.0.1:{reported_port(ctl_log.read_text, lambda: ctl.poll() is None)}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(ctl_url + "/readyz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        assert wait_until(ready, 20, 0.1), ctl_log.read_text()
        config = "[metrics]\nenabled = true\nport = 0\n"
        (tmp_path / "agent").mkdir()
        agent = AgentProcess(
            tmp_path / "agent",
            sinks=("controller",),
            config=config,
            extra_args=["--controller-endpoint", ctl_url, "--heartbeat-interval", "5"],
            env={
                "TAPIO_NODE_NAME": "gw-kernel-node",
                "TAPIO_CONTROLLER_TOKEN_FILE": str(agent_token),
            },
        )
        started = agent.start()
        assert wait_until(
            lambda: any(e.get("event") == "config applied" for e in started.logs()),
            15,
        ), agent.stderr()[-3000:]

        port_a, port_b = closed_port(), closed_port()
        pid_a = refuse_from_child(port_a, 50)
        assert wait_until(lambda: len(ours(nats_server.url, port_a)) >= 50, 20)
        time.sleep(1.5)  # nothing more may arrive
        first = ours(nats_server.url, port_a)
        assert len(first) == 50

        # Secret rotation: both files change, neither process restarts
        for f in (ctl_token, agent_token):
            tmp = f.with_suffix(".new")
            tmp.write_text(token_2 + "\n")
            tmp.replace(f)
        time.sleep(2.5)  # the controller re-checks its file at most once a second
        req = urllib.request.Request(
            ctl_url + "/v1/status", headers={"Authorization": f"Bearer {token_1}"}
        )
        with pytest.raises(urllib.error.HTTPError) as old:
            urllib.request.urlopen(req, timeout=5)
        assert old.value.code == 401

        nats_server.stop()
        pid_b = refuse_from_child(port_b, 50)
        time.sleep(10)
        nats_server.start()
        assert wait_until(lambda: len(ours(nats_server.url, port_b)) >= 50, 40), (
            ctl_log.read_text()[-3000:]
        )
        time.sleep(1.5)
        second = ours(nats_server.url, port_b)
        assert len(second) == 50

        for msgs, pid in ((first, pid_a), (second, pid_b)):
            ids = [m.headers["Nats-Msg-Id"] for m in msgs]
            assert len(set(ids)) == 50
            for m in msgs:
                doc = json.loads(m.data)
                assert m.subject == SUBJECT
                assert m.headers["Tapio-Node"] == "gw-kernel-node" == doc["node_name"]
                assert doc["id"] == m.headers["Nats-Msg-Id"]
                assert doc["data"]["pid"] == pid and doc["data"]["comm"] == "tapio-gwrefuse"
                assert doc["type"] == "kernel.network.connection_refused"
        assert Counter(m.headers["Nats-Msg-Id"] for m in first + second).most_common(1)[0][1] == 1

        agent_metrics = agent.metrics_text()
        assert metric(agent_metrics, "tapio_sink_drops_total", sink="controller") == 0
        with urllib.request.urlopen(ctl_url + "/metrics", timeout=5) as r:
            ctl_metrics = r.read().decode()
        assert metric(ctl_metrics, "tapio_controller_forward_dropped_total") == 0
        assert metric(ctl_metrics, "tapio_controller_events_refused_total") == 0
        assert metric(ctl_metrics, "tapio_controller_forward_retries_total") > 0
        # every batch of the second phase was sent with the rotated token
        assert metric(ctl_metrics, "tapio_controller_auth_failures_total") >= 1  # ours, above
        assert agent.stop() == 0
        agent_stderr = agent.stderr_path.read_bytes()
        agent_stdout = agent.stdout_path.read_bytes()
        agent = None
        ctl.terminate()
        assert ctl.wait(20) == 0
        # the file:// output got the same 100 occurrences, once each (it never went down)
        lines = (tmp_path / "evidence" / "evidence.jsonl").read_bytes().splitlines()
        docs = [json.loads(line) for line in lines]
        mine = [d for d in docs if d["data"].get("dst_port") in (port_a, port_b)]
        assert sorted(d["id"] for d in mine) == sorted(
            m.headers["Nats-Msg-Id"] for m in first + second
        )
        logs = ctl_log.read_bytes() + agent_stderr + agent_stdout
        assert b"controller listening" in logs and b"agent started" in logs
        for token in (token_1, token_2):
            assert token.encode() not in logs
    finally:
        if agent is not None:
            agent.stop()
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(10)
        nats_server.stop()
