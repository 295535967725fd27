"""An in-test Kubernetes API server: pods list (paged) and watch, ReplicaSets, Jobs.

Speaks the real wire format: a list is ``{"kind":"PodList","metadata":{"resourceVersion",
"continue"},"items":[...]}``; a watch (``?watch=true``) is a chunked stream of JSON lines
``{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}`` starting after the
requested ``resourceVersion``; a too-old version (or :meth:`expire`) gets an ``ERROR`` event
with a ``Status`` of code 410, as the real server does once etcd compacted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

Obj = dict[str, Any]


def pod(
    name: str,
    uid: str,
    *,
    namespace: str = "shop",
    node: str = "node-a",
    containers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    owner: tuple[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> Obj:
    """A Pod shaped like what the API server returns for a running pod."""
    meta: Obj = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "resourceVersion": "0",
        "creationTimestamp": "2026-12-01T09:00:00Z",
        "labels": labels or {},
    }
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1" if owner[0] == "ReplicaSet" else "batch/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": f"owner-{owner[1]}",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": c, "image": f"registry.example/{c}:1"} for c, _ in containers],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.244.0.7",
            "containerStatuses": [
                {
                    "name": c,
                    "containerID": f"containerd://{cid}",
                    "image": f"registry.example/{c}:1",
                    "imageID": f"registry.example/{c}@sha256:{'0' * 64}",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": "2026-12-01T09:00:01Z"}},
                }
                for c, cid in containers
            ],
        },
    }


def owned(kind: str, name: str, namespace: str, owner_kind: str, owner_name: str) -> Obj:
    api = "apps/v1" if kind == "ReplicaSet" else "batch/v1"
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"owner-{name}",
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1" if owner_kind == "Deployment" else "batch/v1",
                    "kind": owner_kind,
                    "name": owner_name,
                    "uid": f"owner-{owner_name}",
                    "controller": True,
                }
            ],
        },
        "spec": {},
    }


class FakeApiServer:
    def __init__(self) -> None:
        self.rv = 100
        self.pods: dict[str, Obj] = {}
        self.history: list[tuple[int, str, Obj]] = []
        self.owners: dict[tuple[str, str, str], Obj] = {}
        self.watchers: list[asyncio.Queue[tuple[str, Obj] | None]] = []
        self.list_requests = 0
        self.watch_requests: list[str] = []  # resourceVersion each watch asked for
        self.oldest_rv = 0  # versions below are "compacted": 410
        self.port = 0

    # -- state changes, each emitted to open watches ---------------------------------------

    def _emit(self, kind: str, obj: Obj) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, kind, obj))
        for q in self.watchers:
            q.put_nowait((kind, obj))

    def add(self, obj: Obj) -> None:
        uid = obj["metadata"]["uid"]
        kind = "MODIFIED" if uid in self.pods else "ADDED"
        self.pods[uid] = obj
        self._emit(kind, obj)

    def add_quietly(self, obj: Obj) -> None:
        """A pod created while no watch saw it (only a list shows it)."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.pods[obj["metadata"]["uid"]] = obj

    def delete(self, uid: str) -> None:
        self._emit("DELETED", self.pods.pop(uid))

    def bookmark(self) -> None:
        self.rv += 1
        mark = {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}
        for q in self.watchers:
            q.put_nowait(("BOOKMARK", mark))

    def expire(self) -> None:
        """Compact history: every version up to now is too old; open watches are closed."""
        self.oldest_rv = self.rv + 1
        self.history.clear()
        for q in self.watchers:
            q.put_nowait(None)

    def add_owner(self, obj: Obj) -> None:
        meta = obj["metadata"]
        self.owners[(obj["kind"], meta["namespace"], meta["name"])] = obj

    # -- HTTP ------------------------------------------------------------------------------

    async def pods_route(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request)
        self.list_requests += 1
        items = sorted(self.pods.values(), key=lambda p: p["metadata"]["uid"])
        limit = int(request.query.get("limit", "0") or 0) or len(items) or 1
        start = int(request.query.get("continue", "0") or 0)
        page = items[start : start + limit]
        nxt = start + limit
        meta: Obj = {"resourceVersion": str(self.rv)}
        if nxt < len(items):
            meta["continue"] = str(nxt)
        return web.json_response(
            {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page}
        )

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        rv = request.query.get("resourceVersion", "")
        self.watch_requests.append(rv)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(kind: str, obj: Obj) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if rv and int(rv) < self.oldest_rv:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f"too old resource version: {rv} ({self.oldest_rv})",
                "reason": "Expired",
                "code": 410,
            }
            await send("ERROR", status)
            return resp
        q: asyncio.Queue[tuple[str, Obj] | None] = asyncio.Queue()
        for ev_rv, kind, obj in self.history:
            if not rv or ev_rv > int(rv):
                q.put_nowait((kind, obj))
        self.watchers.append(q)
        timeout = float(request.query.get("timeoutSeconds", "300"))
        try:
            async with asyncio.timeout(timeout):
                while (item := await q.get()) is not None:
                    await send(*item)
        except TimeoutError:
            pass
        finally:
            self.watchers.remove(q)
        return resp

    async def owner_route(self, request: web.Request) -> web.Response:
        kind = "ReplicaSet" if request.match_info["res"] == "replicasets" else "Job"
        key = (kind, request.match_info["ns"], request.match_info["name"])
        if key not in self.owners:
            return web.json_response(
                {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404},
                status=404,
            )
        return web.json_response(self.owners[key])

    @contextlib.asynccontextmanager
    async def serve(self, kubeconfig: Path) -> AsyncIterator[FakeApiServer]:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self.pods_route)
        app.router.add_get("/apis/{group}/v1/namespaces/{ns}/{res}/{name}", self.owner_route)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{self.port}\n"
            "contexts:\n- name: test\n  context: {cluster: test, user: test}\n"
            "users:\n- name: test\n  user: {token: test-sa-token}\n"
        )
        try:
            yield self
        finally:
            self.expire()
            await runner.cleanup()
