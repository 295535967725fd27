"""The enrichment stage on its own: node occurrences named by cgroup path or by pid, and an
enrichment failure that costs the attribution but never the occurrence."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import msgspec

from tapio.agent.pipeline import Enricher
from tapio.bpf.abi import FLAG_NODE, TapioConfig
from tapio.metrics import REGISTRY
from tapio.observers.base import ObserverContext, UserThresholds
from tapio.observers.cgroups import ByCgroupId, CgroupResolver, CgroupRoots
from tapio.observers.node import NodeObserver
from tapio.observers.node.psi import NODE, PsiLine, PsiReading
from tapio.observers.node.runq import RunqTotals, WorstWait
from tapio.occurrence import Occurrence, new_occurrence

CID = "a" * 64
UID = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f"
MS = 1_000_000


def node() -> NodeObserver:
    obs = NodeObserver(ObserverContext(boot_offset_ns=0), roots=CgroupRoots())
    obs.on_config(
        TapioConfig(generation=4, flags=FLAG_NODE, runq_latency_threshold_ns=10 * MS),
        msgspec.convert({}, UserThresholds),
    )
    return obs


def enrich(enricher: Enricher, batch: list[Occurrence]) -> list[Occurrence]:
    anyio.run(enricher.enrich, batch)
    return batch


def test_a_pressured_cgroup_is_attributed_to_its_container(tmp_path: Path) -> None:
    obs = node()
    key = f"/kubepods/burstable/pod{UID}/{CID}"
    readings = {
        NODE: PsiReading(PsiLine(30.0), PsiLine(20.0)),
        key: PsiReading(PsiLine(28.0), PsiLine(19.0)),
    }
    batch = obs.judge_psi(readings, {}, 0)
    assert batch[0].data is not None and "container_id" not in batch[0].data  # observer: facts
    enricher = Enricher.for_specs([NodeObserver.enrichment], CgroupResolver({}, proc=tmp_path))
    [occ] = enrich(enricher, batch)
    assert occ.data is not None and occ.data["cgroup"] == key
    assert occ.data["container_id"] == CID and occ.data["container_runtime"] == "containerd"
    assert occ.data["pod_uid"] == UID and list(occ.data) == sorted(occ.data)


def test_the_worst_waiting_task_is_placed_through_proc(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(
        "0::/system.slice/web.service\n3:cpu,cpuacct:/system.slice/web.service\n"
    )
    obs = node()
    zero = RunqTotals.zero()
    assert obs.judge_runq(zero, None, 0) is None
    hot = RunqTotals(100, 10**9, 10, 0, 0, zero.slots)
    occ = obs.judge_runq(hot, WorstWait(30 * MS, 7, 0, 42, 42, 4, "busy", 0), 0)
    assert occ is not None
    enricher = Enricher.for_specs([NodeObserver.enrichment], CgroupResolver({}, proc=tmp_path))
    [occ] = enrich(enricher, [occ])
    assert occ.data is not None
    assert occ.data["worst_cgroup"] == "/system.slice/web.service"
    assert occ.data["container_id"] == "web.service" and occ.data["container_runtime"] == "systemd"
    assert occ.data["worst_cgroup_id"] == 7 and list(occ.data) == sorted(occ.data)


class BrokenResolver(CgroupResolver):
    def attribution(self, path: str) -> object:  # type: ignore[override]
        raise RuntimeError("attribution bug")


def test_an_enrichment_error_keeps_the_occurrence_and_is_counted(tmp_path: Path) -> None:
    cg = tmp_path / "x.service"
    cg.mkdir()
    enricher = Enricher(
        BrokenResolver({"unified": tmp_path}),
        {"kernel.container.abnormal_exit": ByCgroupId(("unified",), ("unified",))},
    )
    data = {"cgroup2_id": os.stat(cg).st_ino, "cgroup_id": 0, "cgroup_path": None, "pid": 3}
    occ = new_occurrence("kernel.container.abnormal_exit", "warning", "failure", data=data)
    labels = {"observer": "container"}
    before = REGISTRY.get_sample_value("tapio_enrichment_errors_total", labels) or 0.0
    [out] = enrich(enricher, [occ])
    assert out is occ and out.data == data  # delivered as classified
    after = REGISTRY.get_sample_value("tapio_enrichment_errors_total", labels) or 0.0
    assert after - before == 1
