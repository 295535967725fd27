"""Kubernetes enrichment against an in-test API server speaking the list/watch wire format,
forwarded with a file:// output: pod, container and workload names on occurrences, deleted
pods still resolvable, relist after 410 Gone, bookmarks, unknown pods counted."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from tapio.controller import Controller
from tapio.controller.forward import Forwarder
from tapio.controller.forward.file import CURRENT, FileOutput
from tapio.controller.k8s import PodIndex
from tapio.controller.k8s.index import parse_pod
from tapio.controller.k8s.watch import PodWatcher
from tapio.controller.metrics import ControllerMetrics

from .ctl_harness import JSON, batch, capturing_logger, enc, event, hello, running
from .k8s_apiserver import FakeApiServer, owned, pod
from .nats_harness import wait_for

CID_WEB = "a" * 64
CID_SIDECAR = "b" * 64
CID_JOB = "c" * 64
CID_NEW = "d" * 64
UID_WEB = "11111111-2222-3333-4444-555555555555"
UID_JOB = "66666666-7777-8888-9999-000000000000"
UID_NEW = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, s: aiohttp.ClientSession, url: str, ctl: Controller, out: Path) -> None:
        self.s, self.url, self.ctl, self.out = s, url, ctl, out
        self.seq = 0

    async def send(
        self, *facts: dict[str, Any], type: str = "kernel.network.connection_refused"
    ) -> None:
        self.seq += 1
        body = batch(sequence=self.seq, events=[event(type=type, facts=f) for f in facts])
        async with self.s.post(self.url + "/v1/events", data=enc(body), headers=JSON) as r:
            assert r.status == 200, await r.text()

    async def forwarded(self, n: int) -> list[dict[str, Any]]:
        name = self.ctl.forwarder.lanes[0].output.name  # type: ignore[union-attr]
        counter = self.ctl.metrics.forward_forwarded.labels(name)
        await wait_for(lambda: counter._value.get() >= n, 10, f"{n} forwarded")
        lines = (self.out / CURRENT).read_bytes().splitlines()
        return [msgspec.json.decode(line)["data"] for line in lines]

    def metric(self, name: str, label: str) -> float:
        value: float = getattr(self.ctl.metrics, name).labels(label)._value.get()
        return value


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, api: FakeApiServer, clock: Clock) -> AsyncIterator[Rig]:
    log, _ = capturing_logger()
    metrics = ControllerMetrics()
    out = tmp_path / "out"
    index = PodIndex(label_allowlist=["app", "team"], clock=clock, deleted_ttl=300)
    watcher = PodWatcher(
        index, metrics, log, kubeconfig=str(tmp_path / "kubeconfig"), watch_timeout=2
    )
    fwd = Forwarder([FileOutput(f"file://{out}")], metrics, log)
    ctl = Controller(logger=log, metrics=metrics, forwarder=fwd, pod_watcher=watcher)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        r = Rig(s, url, ctl, out)
        async with s.post(url + "/v1/agents/hello", data=enc(hello()), headers=JSON) as resp:
            assert resp.status == 200
        yield r


def seed(api: FakeApiServer) -> None:
    api.add_owner(owned("ReplicaSet", "web-7d9f", "shop", "Deployment", "web"))
    api.add_owner(owned("Job", "report-2891", "batch", "CronJob", "report"))
    api.add(
        pod(
            "web-7d9f-x2k4p",
            UID_WEB,
            containers=[("web", CID_WEB), ("istio-proxy", CID_SIDECAR)],
            owner=("ReplicaSet", "web-7d9f"),
            labels={"app": "web", "team": "shop", "pod-template-hash": "7d9f"},
        )
    )
    api.add(
        pod(
            "report-2891-q8z",
            UID_JOB,
            namespace="batch",
            node="node-b",
            containers=[("report", CID_JOB)],
            owner=("Job", "report-2891"),
        )
    )


async def test_enrichment_end_to_end(tmp_path: Path) -> None:
    api, clock = FakeApiServer(), Clock()
    seed(api)
    async with api.serve(tmp_path / "kubeconfig"), rig(tmp_path, api, clock) as r:
        await wait_for(lambda: r.ctl.pod_watcher.synced, 10, "first list")  # type: ignore[union-attr]
        async with r.s.get(r.url + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["kubernetes_synced"] is True

        # a refused connect and an abnormal exit from a pod's containers
        await r.send(
            {
                "occurrence_id": "o1",
                "container_id": CID_WEB,
                "pod_uid": UID_WEB,
                "dst_port": 5432,
                "pid": 42,
            }
        )
        await r.send(
            {"occurrence_id": "o2", "container_id": CID_JOB, "exit_code": 137, "pid": 7},
            type="kernel.container.abnormal_exit",
        )
        web, job = await r.forwarded(2)
        assert web == {
            "container_id": CID_WEB,
            "container_name": "web",
            "dst_port": 5432,
            "node_name": "node-a",
            "pid": 42,
            "pod_labels": {"app": "web", "team": "shop"},
            "pod_name": "web-7d9f-x2k4p",
            "pod_namespace": "shop",
            "pod_uid": UID_WEB,
            "workload_kind": "Deployment",
            "workload_name": "web",
        }
        assert job["pod_name"] == "report-2891-q8z" and job["pod_namespace"] == "batch"
        assert (job["workload_kind"], job["workload_name"]) == ("CronJob", "report")
        assert job["container_name"] == "report" and job["node_name"] == "node-b"

        # the pod goes away (OOM-killed, say); its evidence arrives 30 s later: still resolves
        api.delete(UID_WEB)
        await wait_for(lambda: UID_WEB not in r.ctl.pod_watcher.index.pods, 10, "delete seen")  # type: ignore[union-attr]
        clock.now += 30
        await r.send({"occurrence_id": "o3", "container_id": CID_SIDECAR})
        late = (await r.forwarded(3))[2]
        assert late["pod_name"] == "web-7d9f-x2k4p" and late["container_name"] == "istio-proxy"

        # bookmarks advance the version the next watch starts from
        api.bookmark()
        bookmark_rv = str(api.rv)
        await wait_for(
            lambda: bookmark_rv in api.watch_requests, 10, "watch resumed at the bookmark"
        )

        # history compacted: the watch gets 410 Gone, relists, and sees a pod it never watched
        lists = api.list_requests
        api.add_quietly(pod("new-1", UID_NEW, containers=[("new", CID_NEW)]))
        api.expire()
        await wait_for(lambda: api.list_requests > lists, 15, "relist after 410")
        assert r.metric("k8s_watch_restarts", "gone") >= 1
        await r.send({"occurrence_id": "o4", "container_id": CID_NEW})
        fresh = (await r.forwarded(4))[3]
        assert fresh["pod_name"] == "new-1" and "workload_kind" not in fresh
        # ...and the list no longer holding the deleted pod kept its tombstone
        clock.now += 30
        await r.send({"occurrence_id": "o5", "pod_uid": UID_WEB})
        assert (await r.forwarded(5))[4]["pod_name"] == "web-7d9f-x2k4p"

        # past the tombstone time, and a container nobody knows: forwarded as is, counted
        clock.now += 300
        hits = r.metric("enrichment", "hit")
        await r.send(
            {"occurrence_id": "o6", "container_id": CID_WEB},
            {"occurrence_id": "o7", "container_id": "f" * 64},
        )
        docs = await r.forwarded(7)
        assert docs[5] == {"container_id": CID_WEB} and docs[6] == {"container_id": "f" * 64}
        assert r.metric("enrichment", "unknown") == 2 and r.metric("enrichment", "hit") == hits
        await r.send({"occurrence_id": "o8", "dst_port": 1})
        await r.forwarded(8)
        assert r.metric("enrichment", "no_ids") == 1
        assert r.ctl.metrics.k8s_pods._value.get() == 2


async def test_unreachable_api_server_backs_off_and_stays_not_ready(tmp_path: Path) -> None:
    from ...ports import closed_port

    (tmp_path / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
        f"clusters:\n- name: t\n  cluster: {{server: 'http://127.0.0.1:{closed_port()}'}}\n"
        "contexts:\n- name: t\n  context: {cluster: t, user: t}\nusers:\n- name: t\n  user: {token: x}\n"
    )
    async with rig(tmp_path, FakeApiServer(), Clock()) as r:
        await wait_for(lambda: r.metric("k8s_watch_restarts", "error") >= 2, 10, "retries")
        async with r.s.get(r.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["kubernetes_synced"] is False
        await r.send({"occurrence_id": "o1", "container_id": CID_WEB})  # forwarded unenriched
        assert (await r.forwarded(1)) == [{"container_id": CID_WEB}]


def test_index_bounds_and_parse() -> None:
    clock = Clock()
    index = PodIndex(max_pods=2, deleted_ttl=60, clock=clock)
    infos = [parse_pod(pod(f"p{i}", f"uid-{i}", containers=[("c", f"{i:064x}")])) for i in range(3)]
    assert all(i is not None for i in infos)
    assert index.upsert(infos[0]) and index.upsert(infos[1])  # type: ignore[arg-type]
    assert not index.upsert(infos[2]) and index.not_indexed == 1  # type: ignore[arg-type]
    index.delete("uid-0")
    assert index.lookup(f"containerd://{0:064x}", None) is infos[0]
    clock.now += 61
    assert index.lookup(f"{0:064x}", None) is None and not index.deleted
    assert parse_pod({"metadata": {"name": "x"}}) is None and parse_pod([]) is None
