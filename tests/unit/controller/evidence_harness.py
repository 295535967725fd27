"""Evidence for the cluster-view tests: batches from several nodes, with the Kubernetes names the
controller's enrichment adds, sent to a controller over real HTTP."""

from __future__ import annotations

from typing import Any

import aiohttp

from .ctl_harness import JSON, batch, enc, event, hello

T0 = 1_800_000_000_000_000_000  # ns


def fact(
    i: int,
    *,
    namespace: str = "shop",
    pod: str = "web-1",
    workload: tuple[str, str] = ("Deployment", "web"),
) -> dict[str, Any]:
    return {
        "dst_port": 1000 + i,
        "pid": 4000 + i,
        "comm": "curl",
        "pod_namespace": namespace,
        "pod_name": pod,
        "workload_kind": workload[0],
        "workload_name": workload[1],
        "occurrence_id": f"01TESTOCC{i:017d}",
    }


#: (node, type, severity, facts) of the standard set, in time order (1 s apart).
def standard() -> list[tuple[str, str, str, dict[str, Any]]]:
    refused = "kernel.network.connection_refused"
    oom = "kernel.container.oom_kill"
    return [
        ("node-a", refused, "warning", fact(0)),
        ("node-a", refused, "warning", fact(1, pod="web-2")),
        (
            "node-b",
            oom,
            "critical",
            fact(2, namespace="payments", pod="pay-1", workload=("Deployment", "pay")),
        ),
        (
            "node-b",
            oom,
            "critical",
            fact(3, namespace="payments", pod="pay-2", workload=("StatefulSet", "ledger")),
        ),
        (
            "node-c",
            refused,
            "error",
            fact(4, namespace="payments", pod="pay-1", workload=("Deployment", "pay")),
        ),
        (
            "node-c",
            "kernel.storage.io_error",
            "error",
            {"device": "sda", "occurrence_id": "01TESTOCC00000000000000005"},
        ),
    ]


async def send_standard(s: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    seqs: dict[str, int] = {}
    for i, (node, type_, severity, facts) in enumerate(standard()):
        agent = f"agent-{node}"
        if agent not in seqs:
            body = hello(agent, node_name=node)
            async with s.post(url + "/v1/agents/hello", data=enc(body), headers=headers) as r:
                assert r.status == 200, await r.text()
            seqs[agent] = 0
        seqs[agent] += 1
        ev = event(
            type=type_,
            severity=severity,
            observer=type_.split(".")[1],
            facts=facts,
            timestamp_unix_nanos=T0 + i * 1_000_000_000,
        )
        body = batch(agent, seqs[agent], node_name=node, events=[ev])
        async with s.post(url + "/v1/events", data=enc(body), headers=headers) as r:
            assert r.status == 200, await r.text()


def auth(token: str | None) -> dict[str, str]:
    return {**JSON, **({"Authorization": f"Bearer {token}"} if token else {})}
