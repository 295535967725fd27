"""Storage classification on recorded bytes: hand-packed ``storage_event`` records framed the way
the ring buffer frames them; device names from a fake sysfs; memoized decoding."""

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
from tapio.observers.cgroups import CgroupResolver
from tapio.observers.storage import (
    METRIC_AMBIGUOUS,
    METRIC_UNMATCHED,
    OP_READ,
    OP_WRITE,
    SEV_CRITICAL,
    SEV_WARNING,
    STORAGE_EVENT,
    DeviceNames,
    StorageObserver,
)
from tapio.occurrence import Occurrence

REFERENCE_KEYS = {
    "bytes",
    "cgroup_id",
    "comm",
    "config_generation",
    "dev_major",
    "dev_minor",
    "error_code",
    "latency_ms",
    "opcode",
    "pid",
    "sector",
    "timestamp_ns",
}


def record(**kw: Any) -> bytes:
    values: dict[str, Any] = {name: 0 for name, _ in STORAGE_EVENT.fields}
    values.update(
        timestamp_ns=9_000_000_000,
        latency_ns=312_340_000,
        sector=32768,
        dev_major=7,
        dev_minor=3,
        bytes=4096,
        nr_sector=8,
        config_generation=1,
        pid=321,
        tid=322,
        rwbs=b"R",
        opcode=OP_READ,
        severity=SEV_CRITICAL,
        comm=b"dd",
    )
    values.update(kw)
    args = [values[n] for n, _ in STORAGE_EVENT.fields if not n.startswith("_")]
    return STORAGE_EVENT.struct.pack(*args)


class Pipeline:
    """The observer and the enrichment stage, as the agent runs them: classify, then enrich."""

    def __init__(self, observer: StorageObserver, resolver: CgroupResolver) -> None:
        self.observer = observer
        self.devices = observer.devices
        self.enricher = Enricher.for_specs([StorageObserver.enrichment], resolver)

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        batch = self.observer.classify(payload)
        anyio.run(self.enricher.enrich, batch)
        return batch


@pytest.fixture()
def obs(tmp_path: Path) -> Pipeline:
    sysfs = tmp_path / "sysdev"
    (sysfs / "7:3").mkdir(parents=True)
    (sysfs / "7:3" / "uevent").write_text("MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\n")
    roots = {h: tmp_path / h for h in ("unified", "memory")}
    for r in roots.values():
        r.mkdir()
    observer = StorageObserver(
        ObserverContext(boot_offset_ns=1_000_000_000_000_000_000), DeviceNames(sysfs)
    )
    return Pipeline(observer, CgroupResolver(roots))


def drops(reason: str) -> float:
    labels = {"observer": "storage", "reason": reason}
    return REGISTRY.get_sample_value("tapio_observer_drops_total", labels) or 0.0


def test_io_error(obs: Pipeline) -> None:
    [occ] = obs.classify(STORAGE_EVENT.framed(record(error_code=-5, latency_ns=2_000_000)))
    assert occ.type == "kernel.storage.io_error"
    assert (occ.severity, occ.outcome) == ("critical", "failure")
    assert occ.error is not None and occ.error.code == "IO_ERROR"
    assert occ.error.message == "I/O error on 7:3 (error=-5, read)"
    d = occ.data
    assert d is not None and d.keys() >= REFERENCE_KEYS and list(d) == sorted(d)
    assert d["device"] == "loop3" and d["error"] == "EIO"
    assert d["sector"] == 32768 and d["nr_sector"] == 8 and d["bytes"] == 4096
    assert d["pid"] == 321 and d["tid"] == 322 and d["comm"] == "dd"
    assert d["pid_source"] == "issue" and d["opcode"] == "read" and d["rwbs"] == "R"
    assert d["latency_ms"] == 2.0


@pytest.mark.parametrize(
    ("severity", "expected"), [(SEV_WARNING, "warning"), (SEV_CRITICAL, "critical")]
)
def test_latency_spike(obs: Pipeline, severity: int, expected: str) -> None:
    [occ] = obs.classify(
        STORAGE_EVENT.framed(record(severity=severity, opcode=OP_WRITE, rwbs=b"FWS"))
    )
    assert occ.type == "kernel.storage.latency_spike"
    assert (occ.severity, occ.outcome) == (expected, "in_progress")
    assert occ.error is not None and occ.error.code == "LATENCY_SPIKE"
    assert occ.error.message == "I/O latency 312.3ms on 7:3 (write)"
    assert occ.data is not None and occ.data["latency_ns"] == 312_340_000
    assert occ.data["rwbs"] == "FWS" and occ.data["opcode"] == "write"


def test_records_that_are_not_anomalies_or_not_read_write_are_dropped(
    obs: Pipeline,
) -> None:
    before = drops("not_an_anomaly"), drops("unknown_record_type")
    payload = STORAGE_EVENT.framed(record(severity=0), record(opcode=7, error_code=-5))
    assert obs.classify(payload) == []
    assert (drops("not_an_anomaly") - before[0], drops("unknown_record_type") - before[1]) == (
        1,
        1,
    )


def test_unknown_device_and_memoized_lookups(obs: Pipeline) -> None:
    payload = STORAGE_EVENT.framed(*(record(dev_minor=m) for m in (3, 3, 9, 9, 3)))
    occs = obs.classify(payload)
    assert [o.data["device"] for o in occs if o.data] == ["loop3", "loop3", None, None, "loop3"]
    assert obs.devices.reads == 2  # one sysfs read per device, misses remembered too


def test_issuer_cgroup_attribution(obs: Pipeline, tmp_path: Path) -> None:
    cid = "cd" * 32
    d = tmp_path / "memory" / "kubepods" / "pod0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f" / cid
    d.mkdir(parents=True)
    [occ] = obs.classify(
        STORAGE_EVENT.framed(
            record(cgroup_id=os.stat(tmp_path / "unified").st_ino, memcg_id=os.stat(d).st_ino)
        )
    )
    assert occ.data is not None
    assert occ.data["container_id"] == cid and occ.data["container_runtime"] == "containerd"
    assert occ.data["cgroup_id"] == os.stat(d).st_ino
    assert occ.data["cgroup_path"] == f"/kubepods/pod0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f/{cid}"
    assert "cpu_cgroup_id" not in occ.data and list(occ.data) == sorted(occ.data)


def test_correlation_drop_counters_are_exported(obs: Pipeline) -> None:
    """The kernel's per-CPU drop counts reach tapio_correlation_drops_total with their reasons
    (read through the runtime's metrics poll, as in the running agent), as deltas."""
    from tapio.agent.pipeline import RunningObserver
    from tapio.agent.runtime import Agent, AgentOptions
    from tapio.agent.settings import AgentSettings
    from tapio.metrics import REGISTRY
    from tapio.sinks.stdout import StdoutSink

    counts = {METRIC_AMBIGUOUS: 3, METRIC_UNMATCHED: 2}

    class Metrics:
        def percpu_u64_sum(self, index: int) -> int:
            return counts.get(index, 0)

    class Obj:
        def map(self, name: str) -> Metrics:
            assert name == "tapio_metrics"
            return Metrics()

    def value(reason: str) -> float:
        labels = {"observer": "storage", "reason": reason}
        return REGISTRY.get_sample_value("tapio_correlation_drops_total", labels) or 0.0

    agent = Agent(AgentSettings(), AgentOptions(ebpf_dir=Path("."), observers=[]), [StdoutSink()])
    agent.observers = [RunningObserver(obs.observer, Obj(), None)]  # type: ignore[arg-type]
    before = value("ambiguous_inflight_io"), value("unmatched_completion")
    agent.poll_kernel_metrics()
    counts[METRIC_AMBIGUOUS] = 10
    agent.poll_kernel_metrics()
    after = value("ambiguous_inflight_io"), value("unmatched_completion")
    assert (after[0] - before[0], after[1] - before[1]) == (10, 2)


def test_short_records_are_malformed(obs: Pipeline) -> None:
    page, size = 4096, 4096
    cons, prod = bytearray(page), bytearray(page + 2 * size)
    ring = RingBuffer(cons, prod, size, page=page)
    pos = 0
    for payload in (record()[:40], record(pid=99)):
        frame = len(payload).to_bytes(4, "little") + bytes(4) + payload
        frame += bytes(-len(frame) % 8)
        for base in (page + pos, page + size + pos):
            prod[base : base + len(frame)] = frame
        pos += len(frame)
    prod[0:8] = pos.to_bytes(8, "little")
    drained = ring.consume_fixed(STORAGE_EVENT.size, 64)
    assert (drained.records, drained.malformed) == (1, 1)
    [occ] = obs.classify(drained.frames)
    assert occ.data is not None and occ.data["pid"] == 99
