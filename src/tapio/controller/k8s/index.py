"""What the controller knows about Pods: container id / pod UID → pod, container, workload.

Fed by the Pod watch (:mod:`tapio.controller.k8s.watch`) with raw Pod JSON objects; read at
ingest for every occurrence carrying ``container_id`` or ``pod_uid`` (both set by the agent
from the task's cgroup path). Lookups are dictionary reads on the event loop, never an API call.

Bounded: at most ``max_pods`` live pods (a pod beyond that is not indexed and counted) and a
tombstone per deleted pod for ``deleted_ttl`` seconds, so evidence that arrives after its pod is
gone (an OOM-killed pod often is) still resolves; tombstones are bounded by ``max_pods`` too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

DEFAULT_MAX_PODS: Final = 50_000
DEFAULT_DELETED_TTL: Final = 300.0


@dataclass(slots=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    node_name: str
    labels: dict[str, str]
    #: container id (no runtime prefix) -> container name
    containers: dict[str, str]
    #: direct controller owner (kind, name), e.g. ("ReplicaSet", "web-7d9f")
    owner: tuple[str, str] | None
    #: resolved workload (kind, name), e.g. ("Deployment", "web"); the owner until resolved
    workload: tuple[str, str] | None = None
    deleted_at: float | None = None


def _strip_runtime(container_id: str) -> str:
    """``containerd://<hex>`` (what the API reports) -> ``<hex>`` (what the agent reports)."""
    return container_id.rsplit("://", 1)[-1]


def parse_pod(obj: Any) -> PodInfo | None:
    """A PodInfo from a raw Pod object, or None when it lacks a uid/name (not a pod)."""
    if not isinstance(obj, dict):
        return None
    meta = obj.get("metadata") or {}
    uid, name = meta.get("uid"), meta.get("name")
    if not isinstance(uid, str) or not isinstance(name, str) or not uid or not name:
        return None
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    containers: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            if isinstance(cs, dict) and isinstance(cs.get("containerID"), str):
                containers[_strip_runtime(cs["containerID"])] = str(cs.get("name", ""))
    owner = None
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") and ref.get("kind") and ref.get("name"):
            owner = (str(ref["kind"]), str(ref["name"]))
            break
    labels = meta.get("labels") or {}
    return PodInfo(
        uid=uid,
        name=name,
        namespace=str(meta.get("namespace", "")),
        node_name=str(spec.get("nodeName", "") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        containers=containers,
        owner=owner,
        workload=owner,
    )


class PodIndex:
    def __init__(
        self,
        *,
        label_allowlist: Iterable[str] = (),
        max_pods: int = DEFAULT_MAX_PODS,
        deleted_ttl: float = DEFAULT_DELETED_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label_allowlist = tuple(label_allowlist)
        self.max_pods = max_pods
        self.deleted_ttl = deleted_ttl
        self._clock = clock
        self.pods: dict[str, PodInfo] = {}
        self.deleted: OrderedDict[str, PodInfo] = OrderedDict()
        self._by_container: dict[str, str] = {}
        self.not_indexed = 0  # pods refused for capacity

    def __len__(self) -> int:
        return len(self.pods)

    def _unlink(self, info: PodInfo) -> None:
        for cid in info.containers:
            if self._by_container.get(cid) == info.uid:
                del self._by_container[cid]

    def upsert(self, info: PodInfo) -> bool:
        previous = self.pods.get(info.uid) or self.deleted.pop(info.uid, None)
        if previous is None and len(self.pods) >= self.max_pods:
            self.not_indexed += 1
            return False
        if previous is not None:
            self._unlink(previous)
            if previous.owner == info.owner and previous.workload is not None:
                info.workload = previous.workload  # keep the resolved Deployment/CronJob
        self.pods[info.uid] = info
        for cid in info.containers:
            self._by_container[cid] = info.uid
        return True

    def delete(self, uid: str) -> None:
        info = self.pods.pop(uid, None)
        if info is None:
            return
        info.deleted_at = self._clock()
        self.deleted[uid] = info  # container ids stay linked until the tombstone expires
        while len(self.deleted) > self.max_pods:
            _, old = self.deleted.popitem(last=False)
            self._unlink(old)
        self.expire()

    def replace_all(self, infos: Iterable[PodInfo]) -> None:
        """After a (re)list: pods missing from it were deleted while we were not watching."""
        seen: set[str] = set()
        for info in infos:
            seen.add(info.uid)
            self.upsert(info)
        for uid in [u for u in self.pods if u not in seen]:
            self.delete(uid)

    def expire(self) -> None:
        now = self._clock()
        while self.deleted:
            info = next(iter(self.deleted.values()))
            if info.deleted_at is not None and now - info.deleted_at < self.deleted_ttl:
                break
            self.deleted.popitem(last=False)
            self._unlink(info)

    def lookup(self, container_id: str | None, pod_uid: str | None) -> PodInfo | None:
        self.expire()
        if container_id:
            uid = self._by_container.get(_strip_runtime(container_id))
            if uid is not None:
                return self.pods.get(uid) or self.deleted.get(uid)
        if pod_uid:
            return self.pods.get(pod_uid) or self.deleted.get(pod_uid)
        return None

    def enrichment(self, info: PodInfo, container_id: str | None) -> dict[str, Any]:
        """The fields added to an occurrence's ``data``."""
        out: dict[str, Any] = {
            "pod_name": info.name,
            "pod_namespace": info.namespace,
            "pod_uid": info.uid,
        }
        if info.node_name:
            out["node_name"] = info.node_name
        if container_id:
            name = info.containers.get(_strip_runtime(container_id))
            if name:
                out["container_name"] = name
        if info.workload is not None:
            out["workload_kind"], out["workload_name"] = info.workload
        labels = {k: info.labels[k] for k in self.label_allowlist if k in info.labels}
        if labels:
            out["pod_labels"] = labels
        return out
