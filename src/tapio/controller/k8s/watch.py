"""One Pod watch for the whole cluster (``--kubernetes``), with ``kubernetes_asyncio``.

Why that client: it is the asyncio port of the official Python client, generated from the
Kubernetes OpenAPI spec and kept in step with Kubernetes releases, and it runs on aiohttp, the
HTTP stack the controller already serves with (one event loop, no extra HTTP library). Its
``Watch`` gives direct control of ``resourceVersion`` and bookmarks, which the relist rules
below need.

Protocol, as the API server expects from a well-behaved watcher:

* list all pods in pages (``limit`` + ``continue``), replace the index with the result (pods
  missing from it were deleted meanwhile), remember the list's ``resourceVersion``;
  the first completed list makes the controller ready;
* watch from that version with ``allowWatchBookmarks`` and a server-side timeout; every event
  and bookmark advances the version, a timeout just re-watches from it;
* ``410 Gone`` (the version is too old) means relist; any other failure reconnects with
  jittered exponential backoff. Both are counted (``tapio_controller_k8s_watch_restarts_total``).

Owners are followed once per ReplicaSet/Job (bounded cache): ReplicaSet → Deployment and
Job → CronJob; a pod owned directly by a StatefulSet or DaemonSet names that.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tapio.controller.k8s.index import PodIndex, PodInfo, parse_pod
from tapio.controller.metrics import ControllerMetrics

PAGE_SIZE: Final = 500
WATCH_TIMEOUT_SECONDS: Final = 300
MAX_OWNERS: Final = 10_000
BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 30.0
_RESOLVABLE: Final = {"ReplicaSet": "Deployment", "Job": "CronJob"}


@dataclass(eq=False)
class PodWatcher:
    """Keeps ``index`` in step with the cluster's pods (see the module docstring)."""

    index: PodIndex
    metrics: ControllerMetrics
    log: Any
    _: KW_ONLY
    kubeconfig: str | None = None
    watch_timeout: int = WATCH_TIMEOUT_SECONDS
    page_size: int = PAGE_SIZE
    synced: bool = field(default=False, init=False)
    lists: int = field(default=0, init=False)
    _owners: OrderedDict[tuple[str, str, str], tuple[str, str]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )

    async def _configuration(self) -> Any:
        cfg = client.Configuration()
        if self.kubeconfig is not None:
            await config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        return cfg

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                cfg = await self._configuration()
                async with client.ApiClient(cfg) as api:
                    core = client.CoreV1Api(api)
                    rv = await self._list(api, core)
                    attempt = 0
                    while True:
                        rv = await self._watch(api, core, rv)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    self.metrics.k8s_watch_restarts.labels("gone").inc()
                    self.log.info("pod watch expired (410 Gone); relisting")
                    continue
                self._restart(f"HTTP {exc.status}")
            except Exception as exc:
                self._restart(type(exc).__name__)
            attempt += 1
            ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt - 1, 16))
            await asyncio.sleep(ceiling / 2 + random.random() * ceiling / 2)

    def _restart(self, reason: str) -> None:
        self.metrics.k8s_watch_restarts.labels("error").inc()
        self.log.warning("pod watch failed; reconnecting", reason=reason)

    async def _list(self, api: Any, core: Any) -> str:
        infos: list[PodInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            resp = await core.list_pod_for_all_namespaces(**kwargs)
            doc = json.loads(await resp.read())
            for item in doc.get("items") or []:
                info = parse_pod(item)
                if info is not None:
                    await self._resolve(api, info)
                    infos.append(info)
            meta = doc.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                rv = str(meta.get("resourceVersion", ""))
                break
        self.index.replace_all(infos)
        self.lists += 1
        self.metrics.k8s_pods.set(len(self.index))
        if not self.synced:
            self.log.info("pod list synced", pods=len(infos))
        self.synced = True
        return rv

    async def _watch(self, api: Any, core: Any, rv: str) -> str:
        w = watch.Watch(return_type="object")
        async with w:
            stream = w.stream(
                core.list_pod_for_all_namespaces,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
            )
            async for event in stream:
                kind, obj = event.get("type"), event.get("raw_object")
                if kind in ("ADDED", "MODIFIED"):
                    info = parse_pod(obj)
                    if info is not None:
                        await self._resolve(api, info)
                        self.index.upsert(info)
                elif kind == "DELETED":
                    info = parse_pod(obj)
                    if info is not None:
                        self.index.delete(info.uid)
                self.metrics.k8s_pods.set(len(self.index))
                rv = w.resource_version or rv
        return str(w.resource_version or rv)

    async def _resolve(self, api: Any, info: PodInfo) -> None:
        """Set ``info.workload`` to the Deployment/CronJob behind its ReplicaSet/Job, if any."""
        if info.owner is None or info.owner[0] not in _RESOLVABLE:
            return
        key = (info.namespace, *info.owner)
        cached = self._owners.get(key)
        if cached is not None:
            self._owners.move_to_end(key)
            info.workload = cached
            return
        kind, name = info.owner
        resp: Any
        try:
            if kind == "ReplicaSet":
                resp = await client.AppsV1Api(api).read_namespaced_replica_set(
                    name, info.namespace, _preload_content=False
                )
            else:
                resp = await client.BatchV1Api(api).read_namespaced_job(
                    name, info.namespace, _preload_content=False
                )
            doc = json.loads(await resp.read())
        except ApiException as exc:
            if exc.status != 404:  # not cached: the next pod of this owner asks again
                return
            doc = {}
        workload = info.owner
        for ref in (doc.get("metadata") or {}).get("ownerReferences") or []:
            if (
                isinstance(ref, dict)
                and ref.get("controller")
                and ref.get("kind") == (_RESOLVABLE[kind])
            ):
                workload = (str(ref["kind"]), str(ref.get("name", "")))
                break
        info.workload = workload
        self._owners[key] = workload
        while len(self._owners) > MAX_OWNERS:
            self._owners.popitem(last=False)
