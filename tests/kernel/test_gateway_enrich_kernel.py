"""Real agent → real controller (``--kubeconfig``, ``--forward file://``): kernel evidence from a
pod-shaped cgroup arrives named by its pod, container and Deployment.

A refused connect and an abnormal exit (exit 3) come from processes placed in the cgroup a
kubelet with the systemd driver makes for a containerd container. The agent resolves the cgroup
to ``container_id``/``pod_uid``; the controller, watching Pods on an in-test API server that
speaks the real list/watch wire format, adds the names. (Deleted pods, a forced 410 relist and
unknown containers are covered against the same API server in
tests/unit/controller/test_k8s_enrichment.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..ports import closed_port, reported_port
from ..unit.controller.k8s_apiserver import FakeApiServer, owned, pod
from .cgroups import cgroup_dirs, missing
from .harness import AgentProcess, require_kernel, stop_process, wait_until
from .podcg import ROLES, pod_cgroup_rel

pytestmark = pytest.mark.kernel

CLIENTS = str(Path(__file__).with_name("net_clients.py"))
POD_UID = "5b8e1c2d-3f4a-4b5c-8d6e-7f8091a2b3c4"
CID = "c" * 32 + "fedcba9876543210" * 2


@contextmanager
def api_server(kubeconfig: Path) -> Iterator[FakeApiServer]:
    """The in-test API server on its own event loop in a thread, stopped on every exit."""
    api = FakeApiServer()
    api.add_owner(owned("ReplicaSet", "web-7d9f", "shop", "Deployment", "web"))
    api.add(
        pod(
            "web-7d9f-x2k4p",
            POD_UID,
            containers=[("web", CID)],
            owner=("ReplicaSet", "web-7d9f"),
        )
    )
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        async with api.serve(kubeconfig):
            started.set()
            await stop.wait()

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    try:
        assert started.wait(10), "the API server did not start"
        yield api
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(10)
        loop.close()


def forwarded(out: Path) -> list[dict[str, Any]]:
    f = out / "evidence.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def test_refused_connect_and_exit_from_a_pod_arrive_named(tmp_path: Path) -> None:
    require_kernel(("network", "container"))
    if missing(ROLES):
        pytest.skip(f"no cgroup hierarchy for {missing(ROLES)}")
    rel = pod_cgroup_rel(POD_UID, CID)
    out, ctl_log = tmp_path / "evidence", tmp_path / "controller.log"
    port = closed_port(socket.AF_INET, "127.0.0.1")
    agent: AgentProcess | None = None
    ctl: subprocess.Popen[bytes] | None = None
    with (
        api_server(tmp_path / "kubeconfig"),
        cgroup_dirs(ROLES, rel, ("memory", "cpu")) as dirs,
    ):
        try:
            with ctl_log.open("wb") as log:
                ctl = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "tapio", "controller", "127.0.0.1:0"),
                        *("--forward", f"file://{out}", "--log-format", "json"),
                        *("--kubeconfig", str(tmp_path / "kubeconfig")),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            url = f"http://127.0.0.1:{reported_port(ctl_log.read_text, lambda: ctl.poll() is None)}"

            def ready() -> bool:  # outputs reachable and the first Pod list synced
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                        return bool(r.status == 200)
                except OSError:
                    return False

            assert wait_until(ready, 20, 0.1), ctl_log.read_text()[-3000:]
            (tmp_path / "agent").mkdir()
            agent = AgentProcess(
                tmp_path / "agent",
                observers=("network", "container"),
                sinks=("controller",),
                config='[container]\nexit_scope = "containers"\n',
                extra_args=["--controller-endpoint", url, "--heartbeat-interval", "5"],
                env={"TAPIO_NODE_NAME": "node-a"},
            )
            agent.start()
            assert wait_until(
                lambda: any(e.get("event") == "config applied" for e in agent.logs()),
                15,
            ), agent.stderr()[-3000:]

            procs = " ".join(sorted({f"{d}/cgroup.procs" for d in dirs.values()}))
            join = f'for f in {procs}; do echo $$ > "$f" || exit 9; done; '
            refuse = [
                sys.executable,
                CLIENTS,
                "refuse",
                "tapio-podref",
                "127.0.0.1",
                str(port),
                "1",
            ]
            r = subprocess.run(
                ["sh", "-c", join + 'exec "$@"', "sh", *refuse], capture_output=True, timeout=60
            )
            assert r.returncode == 0 and r.stdout.split() == [b"1"], r
            e = subprocess.Popen(["sh", "-c", join + "exit 3"])
            assert e.wait(30) == 3

            def mine() -> list[dict[str, Any]]:
                return [
                    o
                    for o in forwarded(out)
                    if (
                        o["type"] == "kernel.network.connection_refused"
                        and o["data"].get("dst_port") == port
                    )
                    or (
                        o["type"] == "kernel.container.abnormal_exit"
                        and o["data"].get("pid") == e.pid
                    )
                ]

            assert wait_until(lambda: len(mine()) >= 2, 30), (
                ctl_log.read_text()[-3000:],
                agent.stderr()[-3000:],
            )
            time.sleep(1.0)  # a duplicate would be in by now
            got = mine()
        finally:
            if agent is not None:
                agent.stop()
            if ctl is not None:
                stop_process(ctl, 15)

    assert sorted(o["type"] for o in got) == [
        "kernel.container.abnormal_exit",
        "kernel.network.connection_refused",
    ], got
    for o in got:
        d = o["data"]
        assert d["container_id"] == CID and d["pod_uid"] == POD_UID, d
        assert (d["pod_name"], d["pod_namespace"]) == ("web-7d9f-x2k4p", "shop"), d
        assert d["container_name"] == "web", d
        assert (d["workload_kind"], d["workload_name"]) == ("Deployment", "web"), d
        assert d["cgroup_path"] == f"/{rel}", d
    exit_ = next(o for o in got if o["type"] == "kernel.container.abnormal_exit")
    assert exit_["data"]["exit_code"] == 3
