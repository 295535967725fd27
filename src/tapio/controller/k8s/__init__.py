"""Kubernetes enrichment (``--kubernetes``): occurrences name their pod, container and workload.

The agent attributes evidence from local kernel facts only (``container_id``, ``pod_uid``
from the task's cgroup). The controller keeps one Pod watch (:mod:`.watch`) and, at ingest,
adds ``pod_name``, ``pod_namespace``, ``pod_uid``, ``container_name``, ``node_name``,
``workload_kind``/``workload_name`` and the allow-listed ``pod_labels`` to ``data`` (never
overwriting a fact the agent sent). An occurrence whose ids match no known pod is forwarded
as it is and counted (``tapio_controller_enrichment_total{result="unknown"}``).
"""

from __future__ import annotations

from typing import Any

from tapio.controller.k8s.index import PodIndex
from tapio.controller.metrics import ControllerMetrics


class Enricher:
    def __init__(self, index: PodIndex, metrics: ControllerMetrics) -> None:
        self.index = index
        self.metrics = metrics

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        container_id = data.get("container_id")
        pod_uid = data.get("pod_uid")
        cid = container_id if isinstance(container_id, str) and container_id else None
        uid = pod_uid if isinstance(pod_uid, str) and pod_uid else None
        if cid is None and uid is None:
            self.metrics.enrichment.labels("no_ids").inc()
            return {}
        info = self.index.lookup(cid, uid)
        if info is None:
            self.metrics.enrichment.labels("unknown").inc()
            return {}
        self.metrics.enrichment.labels("hit").inc()
        return self.index.enrichment(info, cid)


__all__ = ["Enricher", "PodIndex"]
