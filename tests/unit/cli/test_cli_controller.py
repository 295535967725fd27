"""``tapio recent|status|health --controller URL``: the node commands over a controller's window."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tapio.cli.main import main
from tapio.controller import Controller
from tapio.controller.auth import TokenFile

from ..controller.ctl_harness import ThreadServer, capturing_logger, enc, heartbeat
from ..controller.evidence_harness import T0, auth, send_standard

TOKEN = "cli-cluster-token-" + "c" * 20
NOW = T0 + 10 * 1_000_000_000


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def run(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, environ={}, clock=lambda: NOW)
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    d = tmp_path_factory.mktemp("cluster")
    (d / "token").write_text(TOKEN + "\n")
    log, _ = capturing_logger()
    with ThreadServer(Controller(logger=log, token=TokenFile(d / "token"))) as server:
        url = f"http://127.0.0.1:{server.port}"

        async def fill() -> None:
            async with aiohttp.ClientSession() as s:
                await send_standard(s, url, auth(TOKEN))
                failing = heartbeat(
                    "agent-node-b",
                    node_name="node-b",
                    observers={"network": "running", "container": "failed"},
                )
                async with s.post(
                    url + "/v1/agents/heartbeat", data=enc(failing), headers=auth(TOKEN)
                ) as r:
                    assert r.status == 200

        asyncio.run_coroutine_threadsafe(fill(), server.loop).result(20)
        yield url, str(d / "token")


def test_recent_has_node_and_pod_columns_and_filters(cluster: tuple[str, str]) -> None:
    url, token = cluster
    r = run("recent", "--controller", url, "--token-file", token, "--namespace", "payments")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:5] == [
        "2027-01-15T08:00:04",
        "ERROR",
        "node-c",
        "payments/pay-1",
        "kernel.network.connection_refused",
    ]
    assert "pid=4004 comm=curl" in lines[0] and "pod=" not in lines[0]
    assert [ln.split()[2] for ln in lines] == ["node-c", "node-b", "node-b"]
    r = run("recent", "--controller", url, "--token-file", token, "--node", "node-a", "--json")
    docs = [json.loads(line) for line in r.out.splitlines()]
    assert [d["data"]["pod_name"] for d in docs] == ["web-2", "web-1"]
    assert {d["node_name"] for d in docs} == {"node-a"}
    r = run(
        "recent",
        "--controller",
        url,
        "--token-file",
        token,
        "--pod",
        "pay-1",
        "--type",
        "kernel.container.oom_kill",
        "-n",
        "5",
    )
    assert len(r.out.splitlines()) == 1 and "node-b" in r.out
    r = run("recent", "--controller", url, "--token-file", token, "--workload", "Deployment/pay")
    assert len(r.out.splitlines()) == 2
    r = run("recent", "--controller", url, "--token-file", token, "--namespace", "none")
    assert (r.code, r.out) == (0, "no anomalies recorded\n")
    r = run("recent", "--controller", url, "--token-file", token, "-n", "2")
    assert len(r.out.splitlines()) == 2
    # the node's own line format is unchanged: no cluster columns there
    assert "storage.io_error" in run("recent", "--controller", url, "--token-file", token).out


def test_status_and_health(cluster: tuple[str, str]) -> None:
    url, token = cluster
    r = run("status", "--controller", url, "--token-file", token, "--json")
    doc = json.loads(r.out)
    assert doc["total"] == 6
    assert {o["name"]: o["count"] for o in doc["observers"]} == {
        "network": 3,
        "container": 2,
        "storage": 1,
    }
    r = run("status", "--controller", url, "--token-file", token, "--namespace", "shop")
    assert r.code == 0 and "network      2" in r.out
    r = run("health", "--controller", url, "--token-file", token, "--json")
    assert r.code == 1
    h = json.loads(r.out)
    assert h["status"] == "degraded" and h["total_anomalies_1h"] == 6
    assert h["failed_observers"] == ["node-b/container"]
    r = run("health", "--controller", url, "--token-file", token)
    assert r.code == 1 and "overall: degraded" in r.out and "node-b: container failed" in r.out
    r = run("health", "storage", "--controller", url, "--token-file", token, "--node", "node-a")
    assert r.code == 0, r.out  # nothing from node-a's storage, and node-a's agent is fine
    r = run("health", "scheduler", "--controller", url, "--token-file", token)
    assert r.code == 0 and "no anomalies in last hour" in r.out


def test_without_the_token_all_refused(cluster: tuple[str, str], tmp_path: Path) -> None:
    url, _ = cluster
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    for cmd in ("recent", "status"):
        r = run(cmd, "--controller", url)
        assert r.code == 1 and r.out == ""
        assert "401 UNAUTHORIZED: missing bearer token" in r.err
        r = run(cmd, "--controller", url, "--token-file", str(wrong))
        assert r.code == 1 and "401 UNAUTHORIZED: invalid bearer token" in r.err
        assert "not-the-token" not in r.err
    r = run("health", "--controller", url)
    assert r.code == 3 and r.err.startswith("error: no data:")


def test_usage_errors() -> None:
    r = run("recent", "--namespace", "x")
    assert r.code == 2 and "--namespace needs --controller URL" in r.err
    r = run("recent", "--controller", "http://127.0.0.1:9", "--data-dir", "/tmp")
    assert r.code == 2 and "give one" in r.err
    r = run("recent", "--type", "cluster.scheduler.latency_spike")
    assert r.code == 2 and "needs --controller" in r.err
    r = run("recent", "--controller", "ftp://x")
    assert r.code == 1 and "expected http(s)://HOST:PORT" in r.err
    r = run("recent", "--controller", "http://127.0.0.1:9")
    assert r.code == 1 and "cannot reach controller" in r.err
