"""The cluster view end to end: real agent → controller (enriching from the in-test Kubernetes API
server) → ``GET /v1/evidence``, ``tapio recent --controller`` and MCP over streamable HTTP.

A process in a pod-shaped cgroup is refused a connection; the agent sends the occurrence with
the connecting task's cgroup (container id, pod uid), the controller names the pod from its Pod
watch and keeps the occurrence in its evidence window. Asking by namespace through each of the
three doors returns it; without the token each door is refused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..ports import closed_port
from ..unit.controller.k8s_apiserver import owned, pod
from ..unit.controller.mcp_client import mcp_session_call
from .cgroups import cgroup_dirs, missing
from .harness import AgentProcess, require_kernel, wait_until
from .podcg import ROLES, api_server, call, pod_cgroup_rel, refuse_in_cgroup

pytestmark = pytest.mark.kernel

POD_UID = "7d1e4c2b-9a8f-4b6c-8d5e-1f2a3b4c5d6e"
CID = "c1" * 16 + "0123456789abcdef" * 2
NAMESPACE = "payments-kernel"
NODE = "cluster-kernel-node"
TOKEN = "cluster-kernel-token-" + "k" * 24


def _get(url: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _controller_url(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"controller listening"' in line:
            host, port = json.loads(line)["addresses"][0][:2]
            return f"http://{host}:{port}"
    return None


def _tapio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapio", *args], capture_output=True, text=True, timeout=60
    )


def test_refused_connect_from_a_pod_through_evidence_api_cli_and_mcp(tmp_path: Path) -> None:
    require_kernel(("network",))
    if missing(ROLES):
        pytest.skip(f"no cgroup hierarchy for {missing(ROLES)}")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    kubeconfig = tmp_path / "kubeconfig"
    rel = pod_cgroup_rel(POD_UID, CID)
    port = closed_port(socket.AF_INET, "127.0.0.1")
    ctl_log = tmp_path / "controller.log"
    agent: AgentProcess | None = None
    ctl: subprocess.Popen[bytes] | None = None
    with api_server(kubeconfig) as api, cgroup_dirs(ROLES, rel, ("memory", "cpu")) as dirs:
        call(
            api, "add_owner", owned("ReplicaSet", "ledger-5d9c7", NAMESPACE, "Deployment", "ledger")
        )
        call(
            api,
            "add",
            pod(
                "ledger-5d9c7-x2v4q",
                POD_UID,
                namespace=NAMESPACE,
                node=NODE,
                containers=[("app", CID)],
                owner=("ReplicaSet", "ledger-5d9c7"),
            ),
        )
        try:
            with open(ctl_log, "wb") as log:
                ctl = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "tapio", "controller", "127.0.0.1:0"),
                        *("--agent-token-file", str(token_file), "--kubeconfig", str(kubeconfig)),
                        *("--log-format", "json"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            url = wait_until(lambda: _controller_url(ctl_log), 20, 0.1)
            assert url, ctl_log.read_text()[-3000:]
            assert wait_until(lambda: _get(url + "/readyz", None)[0] == 200, 20, 0.1)
            (tmp_path / "agent").mkdir()
            agent = AgentProcess(
                tmp_path / "agent",
                sinks=("controller",),
                extra_args=["--controller-endpoint", url, "--heartbeat-interval", "5"],
                env={"TAPIO_NODE_NAME": NODE, "TAPIO_CONTROLLER_TOKEN_FILE": str(token_file)},
            )
            agent.start()
            assert wait_until(
                lambda: any(e.get("event") == "config applied" for e in agent.logs()),  # type: ignore[union-attr]
                15,
            ), agent.stderr()[-3000:]
            pid = refuse_in_cgroup(dirs, port, 2, "tapio-clrefuse")

            evidence = url + f"/v1/evidence?namespace={NAMESPACE}"

            def ours() -> list[dict[str, Any]]:
                status, body = _get(evidence, TOKEN)
                assert status == 200, body
                return [d for d in body["evidence"] if d["data"].get("dst_port") == port]

            assert wait_until(lambda: len(ours()) >= 2, 20), ctl_log.read_text()[-3000:]
            time.sleep(1.0)
            docs = ours()
            assert len(docs) == 2
            for d in docs:
                data = d["data"]
                assert d["type"] == "kernel.network.connection_refused"
                assert d["node_name"] == NODE and data["pid"] == pid
                assert data["container_id"] == CID and data["pod_uid"] == POD_UID
                assert data["pod_name"] == "ledger-5d9c7-x2v4q"
                assert data["pod_namespace"] == NAMESPACE and data["container_name"] == "app"
                assert (data["workload_kind"], data["workload_name"]) == ("Deployment", "ledger")
            ids = sorted(d["id"] for d in docs)
            status, body = _get(url + "/v1/evidence?namespace=elsewhere", TOKEN)
            assert status == 200 and body["evidence"] == []

            # the CLI, as an operator would run it
            ask = ("recent", "--controller", url, "--token-file", str(token_file))
            r = _tapio(*ask, "--namespace", NAMESPACE, "--json")
            assert r.returncode == 0, r.stderr
            cli_docs = [json.loads(line) for line in r.stdout.splitlines()]
            assert sorted(d["id"] for d in cli_docs if d["data"].get("dst_port") == port) == ids
            r = _tapio(*ask, "--namespace", NAMESPACE)
            lines = [ln for ln in r.stdout.splitlines() if "connection_refused" in ln]
            assert len(lines) == 2
            assert all(f"{NODE}  {NAMESPACE}/ledger-5d9c7-x2v4q" in ln for ln in lines), lines

            # MCP over streamable HTTP with the official SDK client
            _, results, _ = asyncio.run(
                mcp_session_call(
                    url + "/mcp",
                    TOKEN,
                    [("tapio_recent_anomalies", {"namespace": NAMESPACE, "minutes": 30})],
                )
            )
            (result,) = results
            assert not result.is_error, result.content
            anomalies = result.structured_content["anomalies"]
            assert sorted(a["id"] for a in anomalies if a["data"].get("dst_port") == port) == ids

            # without the token: all three refused
            for token in (None, "wrong-token"):
                status, body = _get(evidence, token)
                assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
            r = _tapio("recent", "--controller", url, "--namespace", NAMESPACE)
            assert r.returncode == 1 and "401 UNAUTHORIZED" in r.stderr and r.stdout == ""
            with pytest.raises(BaseException):  # noqa: B017 - the SDK raises a group
                asyncio.run(mcp_session_call(url + "/mcp", None, []))
            with pytest.raises(BaseException):  # noqa: B017
                asyncio.run(mcp_session_call(url + "/mcp", "wrong-token", []))
            assert agent.stop() == 0
            agent = None
            ctl.terminate()
            assert ctl.wait(20) == 0
            assert TOKEN.encode() not in ctl_log.read_bytes()
        finally:
            if agent is not None:
                agent.stop()
            if ctl is not None and ctl.poll() is None:
                ctl.kill()
                ctl.wait(10)
