"""Container classification on recorded bytes: hand-packed ``container_event`` records, framed the
way the ring buffer frames them, decoded by the observer; cgroups from a fake tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from tapio.agent.pipeline import Enricher
from tapio.bpf.ringbuf import RingBuffer
from tapio.metrics import REGISTRY
from tapio.observers.base import ObserverContext
from tapio.observers.cgroups import U64_MAX, CgroupResolver
from tapio.observers.container import (
    CONTAINER_EVENT,
    EV_EXIT,
    EV_OOM_KILL,
    FLAG_CORE_DUMPED,
    FLAG_LIMIT_VALID,
    FLAG_RSS_FIELDS,
    FLAG_TASK_CGROUPS,
    PAGE_COUNTER_MAX,
    PAGE_SIZE,
    ContainerObserver,
)
from tapio.occurrence import Occurrence

BOOT = 1_700_000_000_000_000_000
CID = "ab" * 32
UID = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f"
REFERENCE_KEYS = {
    "cgroup_id",
    "config_generation",
    "exit_code",
    "memory_limit_bytes",
    "memory_usage_bytes",
    "pid",
    "signal",
    "tid",
    "timestamp_ns",
}


def record(**kw: Any) -> bytes:
    values: dict[str, Any] = {name: 0 for name, _ in CONTAINER_EVENT.fields}
    values["comm"] = b"app"
    values["config_generation"] = 3
    values["timestamp_ns"] = 5_000_000_000
    values.update(kw)
    args = [values[n] for n, _ in CONTAINER_EVENT.fields if not n.startswith("_")]
    return CONTAINER_EVENT.struct.pack(*args)


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    roots = {h: tmp_path / h for h in ("unified", "memory", "cpu")}
    for r in roots.values():
        r.mkdir()
    (tmp_path / "proc").mkdir()
    return roots


class Pipeline:
    """The observer and the enrichment stage, as the agent runs them: classify, then enrich."""

    def __init__(self, tree: dict[str, Path]) -> None:
        self.observer = ContainerObserver(ObserverContext(boot_offset_ns=BOOT))
        resolver = CgroupResolver(tree, proc=tree["unified"].parent / "proc")
        self.enricher = Enricher.for_specs([ContainerObserver.enrichment], resolver)

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        batch = self.observer.classify(payload)
        anyio.run(self.enricher.enrich, batch)
        return batch


def observer(tree: dict[str, Path]) -> Pipeline:
    return Pipeline(tree)


def drops(reason: str) -> float:
    labels = {"observer": "container", "reason": reason}
    return REGISTRY.get_sample_value("tapio_observer_drops_total", labels) or 0.0


def test_oom_kill_from_the_victims_task(tree: dict[str, Path]) -> None:
    cg = tree["memory"] / "tapio-test"
    cg.mkdir()
    ino = os.stat(cg).st_ino
    obs = observer(tree)
    limit_pages = (64 << 20) // PAGE_SIZE
    [occ] = obs.classify(
        CONTAINER_EVENT.framed(
            record(
                event_type=EV_OOM_KILL,
                pid=4242,
                signal=9,
                memcg_id=ino,
                cgroup_id=1,
                cpu_cgroup_id=1,
                anon_rss_kb=60000,
                file_rss_kb=3000,
                shmem_rss_kb=16,
                total_vm_kb=90000,
                memory_usage_bytes=(60000 + 3000 + 16) * 1024,
                memory_limit_pages=limit_pages,
                flags=FLAG_TASK_CGROUPS | FLAG_RSS_FIELDS | FLAG_LIMIT_VALID,
                comm=b"python3",
                uid=0,
                oom_score_adj=-17,
            )
        )
    )
    assert occ.type == "kernel.container.oom_kill"
    assert (occ.severity, occ.outcome) == ("critical", "failure")
    assert occ.error is not None and occ.error.code == "OOM_KILL"
    assert occ.error.message == "OOM kill pid=4242 (usage=61MB, limit=64MB)"
    d = occ.data
    assert d is not None
    assert d.keys() >= REFERENCE_KEYS
    assert list(d) == sorted(d)
    assert d["memory_usage_bytes"] == 63016 * 1024
    assert d["memory_limit_bytes"] == 64 << 20
    assert d["cgroup_id"] == ino and d["memory_cgroup_id"] == ino
    assert d["cgroup_path"] == "/tapio-test" and d["cgroup_source"] == "task"
    assert d["comm"] == "python3" and d["signal"] == 9 and d["exit_code"] == 137
    assert d["oom_score_adj"] == -17
    assert occ.timestamp == "2023-11-14T22:13:25+00:00"  # boot offset + monotonic ts


def test_oom_limit_max_and_missing_rss(tree: dict[str, Path]) -> None:
    obs = observer(tree)
    [occ] = obs.classify(
        CONTAINER_EVENT.framed(
            record(
                event_type=EV_OOM_KILL,
                pid=1,
                memory_limit_pages=PAGE_COUNTER_MAX,
                flags=FLAG_TASK_CGROUPS | FLAG_LIMIT_VALID,
            )
        )
    )
    assert occ.data is not None
    assert occ.data["memory_limit_bytes"] == U64_MAX
    assert occ.data["memory_usage_bytes"] is None  # absent from the tracepoint: not guessed
    assert "anon_rss_kb" not in occ.data


def test_oom_victim_not_current_resolved_through_proc_or_unknown(
    tree: dict[str, Path], tmp_path: Path
) -> None:
    pod = tree["memory"] / "kubepods" / "burstable" / f"pod{UID}" / CID
    pod.mkdir(parents=True)
    (pod / "memory.limit_in_bytes").write_text(str(32 << 20))
    (tmp_path / "proc" / "77").mkdir()
    (tmp_path / "proc" / "77" / "cgroup").write_text(
        f"4:memory:/kubepods/burstable/pod{UID}/{CID}\n1:cpu,cpuacct:/\n0::/\n"
    )
    obs = observer(tree)
    alive, gone = obs.classify(
        CONTAINER_EVENT.framed(
            record(event_type=EV_OOM_KILL, pid=77, flags=FLAG_RSS_FIELDS),
            record(event_type=EV_OOM_KILL, pid=78, flags=FLAG_RSS_FIELDS),
        )
    )
    assert alive.data is not None and gone.data is not None
    assert alive.data["cgroup_source"] == "proc"
    assert alive.data["memory_cgroup_id"] == os.stat(pod).st_ino
    assert alive.data["container_id"] == CID and alive.data["pod_uid"] == UID
    assert alive.data["container_runtime"] == "containerd"
    assert alive.data["memory_limit_bytes"] == 32 << 20  # from the cgroup file
    assert gone.data["cgroup_source"] == "unknown"
    assert gone.data["cgroup_path"] is None and gone.data["cgroup_id"] == 0
    assert gone.data["memory_limit_bytes"] is None
    assert "container_id" not in gone.data and "pod_uid" not in gone.data


@pytest.mark.parametrize(
    ("status", "code", "sig", "severity", "core"),
    [
        (3 << 8, 3, 0, "warning", False),
        (11 | 0x80, 0, 11, "error", True),
        (9, 0, 9, "error", False),
    ],
)
def test_abnormal_exit_severity_and_decoding(
    tree: dict[str, Path], status: int, code: int, sig: int, severity: str, core: bool
) -> None:
    unit = tree["unified"] / "system.slice" / "web.service"
    unit.mkdir(parents=True)
    obs = observer(tree)
    [occ] = obs.classify(
        CONTAINER_EVENT.framed(
            record(
                event_type=EV_EXIT,
                pid=500,
                tid=503,
                exit_code=code,
                signal=sig,
                raw_status=status,
                flags=FLAG_TASK_CGROUPS | (FLAG_CORE_DUMPED if core else 0),
                cgroup_id=os.stat(unit).st_ino,
                memcg_id=os.stat(tree["memory"]).st_ino,
                cpu_cgroup_id=os.stat(tree["cpu"]).st_ino,
            )
        )
    )
    assert occ.type == "kernel.container.abnormal_exit"
    assert occ.severity == severity and occ.outcome == "failure"
    assert occ.error is not None
    assert occ.error.message == f"Abnormal exit pid=500 (code={code}, signal={sig})"
    d = occ.data
    assert d is not None and d.keys() >= REFERENCE_KEYS
    assert d["tid"] == 503 and d["core_dumped"] is core
    assert d["container_id"] == "web.service" and d["container_runtime"] == "systemd"
    assert d["cgroup_path"] == "/system.slice/web.service"
    assert ("signal_name" in d) is bool(sig)
    if sig == 11:
        assert d["signal_name"] == "SIGSEGV"


def test_root_cgroups_have_no_attribution(tree: dict[str, Path]) -> None:
    obs = observer(tree)
    [occ] = obs.classify(
        CONTAINER_EVENT.framed(
            record(
                event_type=EV_EXIT,
                pid=1,
                exit_code=1,
                flags=FLAG_TASK_CGROUPS,
                cgroup_id=os.stat(tree["unified"]).st_ino,
                memcg_id=os.stat(tree["memory"]).st_ino,
            )
        )
    )
    assert occ.data is not None
    assert occ.data["cgroup_path"] == "/" and "container_id" not in occ.data


def test_unknown_event_types_are_dropped(tree: dict[str, Path]) -> None:
    before = drops("unknown_record_type")
    assert observer(tree).classify(CONTAINER_EVENT.framed(record(event_type=9))) == []
    assert drops("unknown_record_type") - before == 1


def test_classified_but_not_enriched_keeps_the_same_keys(tree: dict[str, Path]) -> None:
    """The observer alone already writes every cgroup key the enricher fills in."""
    payload = CONTAINER_EVENT.framed(record(event_type=EV_EXIT, pid=5, exit_code=1))
    [raw] = observer(tree).observer.classify(payload)
    [enriched] = observer(tree).classify(payload)
    assert raw.data is not None and enriched.data is not None
    assert list(raw.data) == list(enriched.data)
    assert raw.data["cgroup_source"] == "unknown" and raw.data["cgroup_path"] is None


def test_short_records_are_malformed_and_never_classified(tree: dict[str, Path]) -> None:
    """A record shorter than the struct is counted by the ring consumer and skipped."""
    page, size = 4096, 4096
    cons, prod = bytearray(page), bytearray(page + 2 * size)
    ring = RingBuffer(cons, prod, size, page=page)
    pos = 0
    good = record(event_type=EV_EXIT, pid=9, exit_code=2, flags=0)
    for payload in (good[:100], good):
        frame = len(payload).to_bytes(4, "little") + bytes(4) + payload
        frame += bytes(-len(frame) % 8)
        for base in (page + pos, page + size + pos):
            prod[base : base + len(frame)] = frame
        pos += len(frame)
    prod[0:8] = pos.to_bytes(8, "little")
    drained = ring.consume_fixed(CONTAINER_EVENT.size, 64)
    assert (drained.records, drained.malformed) == (1, 1)
    [occ] = observer(tree).classify(drained.frames)
    assert occ.data is not None and occ.data["pid"] == 9 and occ.data["exit_code"] == 2
