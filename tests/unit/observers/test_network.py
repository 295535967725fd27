"""Network classification on recorded bytes (the kernel decided the fact; Python formats it)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import msgspec

from tapio.agent.pipeline import Enricher
from tapio.observers.base import ObserverContext
from tapio.observers.cgroups import ByCgroupId, CgroupResolver
from tapio.observers.network import NETWORK_EVENT, NetworkObserver
from tapio.occurrence import (
    NETWORK_CONNECTION_REFUSED,
    NETWORK_CONNECTION_TIMEOUT,
    NETWORK_RETRANSMIT_SPIKE,
    NETWORK_RTT_DEGRADATION,
    decode,
    encode,
)

V4_SRC = socket.inet_aton("10.1.2.3") + bytes(12)
V4_DST = socket.inet_aton("10.9.8.7") + bytes(12)
V6_SRC = socket.inet_pton(socket.AF_INET6, "fd00::1")
V6_DST = socket.inet_pton(socket.AF_INET6, "fd00::2")
BOOT = 1_700_000_000_000_000_000


def record(**kw: object) -> bytes:
    f = {
        "timestamp_ns": 5_000_000_123,
        "config_generation": 3,
        "pid": 42,
        "tid": 43,
        "event_type": 1,
        "family": 2,
        "pid_source": 1,
        "old_state": 2,
        "new_state": 7,
        "flags": 1,
        "sport": 40000,
        "dport": 80,
        "saddr": V4_SRC,
        "daddr": V4_DST,
        "sk_err": 111,
        "retrans_count": 0,
        "total_retrans": 0,
        "snd_cwnd": 0,
        "rtt_baseline_us": 0,
        "rtt_current_us": 0,
        "rtt_samples": 0,
        "duration_ns": 1_500_000,
        "comm": b"curl".ljust(16, b"\0"),
        "cgroup_id": 7001,
        "memcg_id": 7002,
        "cpu_cgroup_id": 7003,
    }
    f.update(kw)
    names = [n for n, _ in NETWORK_EVENT.fields if not n.startswith("_")]
    return NETWORK_EVENT.struct.pack(*(f[n] for n in names))


def classify(*records: bytes) -> list[dict[str, object]]:
    obs = NetworkObserver(ObserverContext(boot_offset_ns=BOOT))
    out = obs.classify(NETWORK_EVENT.framed(*records))
    return [msgspec.json.decode(encode(o)) for o in out]


def test_refused_ipv4() -> None:
    [o] = classify(record())
    assert o["type"] == "kernel.network.connection_refused"
    assert (o["severity"], o["outcome"]) == ("warning", "failure")
    assert o["error"] == {"code": "RST_RECEIVED", "message": "TCP RST 10.1.2.3:40000 → 10.9.8.7:80"}
    assert o["timestamp"] == "2023-11-14T22:13:25.000000123+00:00"
    d = o["data"]
    assert list(d) == sorted(d)  # contract: data keys sorted
    assert d == {
        "cgroup2_id": 7001,
        "cgroup_id": 7001,
        "cgroup_path": None,
        "comm": "curl",
        "config_generation": 3,
        "connect_duration_ms": 1.5,
        "cpu_cgroup_id": 7003,
        "dst_ip": "10.9.8.7",
        "dst_port": 80,
        "family": "ipv4",
        "memory_cgroup_id": 7002,
        "pid": 42,
        "pid_source": "connect",
        "protocol": "tcp",
        "reason": "rst",
        "src_ip": "10.1.2.3",
        "src_port": 40000,
        "tid": 43,
        "timestamp_ns": 5_000_000_123,
    }


def test_refused_by_icmp_and_ipv6() -> None:
    [o] = classify(record(family=10, saddr=V6_SRC, daddr=V6_DST, flags=0))
    assert o["data"]["reason"] == "icmp"
    assert o["data"]["family"] == "ipv6"
    assert o["error"]["message"] == "TCP RST fd00::1:40000 → fd00::2:80"


def test_timeout() -> None:
    [o] = classify(record(event_type=2, sk_err=110, flags=0, duration_ns=3_000_000_000))
    assert o["type"] == "kernel.network.connection_timeout"
    assert (o["severity"], o["error"]["code"]) == ("error", "SYN_TIMEOUT")
    assert o["error"]["message"] == "Connection timeout to 10.9.8.7:80 (SYN_SENT→CLOSE)"
    d = o["data"]
    assert (d["old_state"], d["new_state"], d["error"]) == ("SYN_SENT", "CLOSE", "ETIMEDOUT")
    assert d["connect_duration_ms"] == 3000.0
    assert (d["cgroup_id"], d["cpu_cgroup_id"]) == (7001, 7003)
    assert list(d) == sorted(d)


def test_retransmit_spike() -> None:
    [o] = classify(
        record(
            event_type=3,
            retrans_count=7,
            total_retrans=5,
            snd_cwnd=10,
            old_state=1,
            duration_ns=1_000_000_000,
            pid_source=0,
            pid=0,
            cgroup_id=0,
            memcg_id=0,
            cpu_cgroup_id=0,
        )
    )
    assert o["type"] == "kernel.network.retransmit_spike"
    assert o["error"]["message"] == "TCP retransmit 10.1.2.3:40000 → 10.9.8.7:80 (total=5, cwnd=10)"
    d = o["data"]
    assert (d["retransmits_in_window"], d["window_ms"], d["tcp_state"]) == (
        7,
        1000.0,
        "ESTABLISHED",
    )
    assert d["pid_source"] == "none" and d["pid"] == 0
    # No connect seen: no owner, so no cgroup either (unknown, never guessed).
    assert (d["cgroup2_id"], d["cgroup_id"], d["cgroup_path"]) == (0, 0, None)
    assert list(d) == sorted(d)


def test_rtt_degradation() -> None:
    [o] = classify(record(event_type=4, rtt_baseline_us=2000, rtt_current_us=50000, rtt_samples=9))
    assert o["type"] == "kernel.network.rtt_degradation"
    assert o["outcome"] == "in_progress"
    assert (
        o["error"]["message"]
        == "RTT spike 10.1.2.3:40000 → 10.9.8.7:80 (baseline=2ms, current=50ms)"
    )
    d = o["data"]
    assert (d["baseline_ms"], d["current_ms"], d["baseline_us"], d["current_us"]) == (
        2,
        50,
        2000,
        50000,
    )
    assert (d["cgroup2_id"], d["memory_cgroup_id"], d["cpu_cgroup_id"]) == (7001, 7002, 7003)
    assert list(d) == sorted(d)


def test_unknown_event_type_and_invalid_comm() -> None:
    assert classify(record(event_type=99)) == []
    [o] = classify(record(comm=b"\xff\xfe".ljust(16, b"\0")))
    assert o["data"]["comm"] == "<invalid>"


def test_occurrence_round_trips_and_validates() -> None:
    obs = NetworkObserver(ObserverContext(boot_offset_ns=BOOT))
    [occ] = obs.classify(NETWORK_EVENT.framed(record()))
    back = decode(encode(occ))
    assert back == occ
    assert len(occ.id) == 26
    raw = encode(occ)
    for key in (b"reasoning", b"context", b"history", b"possible_causes", b"suggested_fix"):
        assert key not in raw


def test_primary_id_falls_back_to_a_v1_controller() -> None:
    """No cgroup2 id (a task outside the unified tree): the cpu, then memory id stands for it."""
    [o] = classify(record(cgroup_id=0, memcg_id=11, cpu_cgroup_id=12))
    assert (o["data"]["cgroup_id"], o["data"]["cgroup2_id"]) == (12, 0)
    [o] = classify(record(cgroup_id=0, memcg_id=11, cpu_cgroup_id=0))
    assert o["data"]["cgroup_id"] == 11


def test_every_tcp_type_is_enriched_by_the_connectors_cgroups() -> None:
    spec = NetworkObserver.enrichment
    tcp = {
        NETWORK_CONNECTION_REFUSED,
        NETWORK_CONNECTION_TIMEOUT,
        NETWORK_RETRANSMIT_SPIKE,
        NETWORK_RTT_DEGRADATION,
    }
    assert tcp <= set(spec)
    assert all(isinstance(spec[t], ByCgroupId) for t in spec)  # DNS types too
    for s in (spec[t] for t in tcp):
        assert isinstance(s, ByCgroupId)
        assert set(s.hierarchies) == {"unified", "memory", "cpu"}
        assert s.order[0] == "unified"


def test_the_connecting_tasks_cgroup_names_its_pod(tmp_path: Path) -> None:
    """Hybrid host: the pod lives in the v1 cpu tree, the task is in the unified root."""
    uid, cid = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f", "b" * 64
    roots = {h: tmp_path / h for h in ("unified", "memory", "cpu")}
    for r in roots.values():
        r.mkdir()
    pod = roots["cpu"] / "kubepods" / "burstable" / f"pod{uid}" / cid
    pod.mkdir(parents=True)
    obs = NetworkObserver(ObserverContext(boot_offset_ns=BOOT))
    batch = obs.classify(
        NETWORK_EVENT.framed(
            record(
                cgroup_id=os.stat(roots["unified"]).st_ino,
                memcg_id=os.stat(roots["memory"]).st_ino,
                cpu_cgroup_id=os.stat(pod).st_ino,
            ),
            record(pid_source=0, pid=0, cgroup_id=0, memcg_id=0, cpu_cgroup_id=0),
        )
    )
    enricher = Enricher.for_specs([NetworkObserver.enrichment], CgroupResolver(roots))
    anyio.run(enricher.enrich, batch)
    owned, orphan = (o.data for o in batch)
    assert owned is not None and orphan is not None
    assert owned["cgroup_path"] == f"/kubepods/burstable/pod{uid}/{cid}"
    assert owned["cgroup_id"] == os.stat(pod).st_ino
    assert (owned["container_id"], owned["pod_uid"]) == (cid, uid)
    assert owned["container_runtime"] == "containerd" and list(owned) == sorted(owned)
    assert orphan["cgroup_path"] is None and "container_id" not in orphan


def test_a_large_batch_asks_the_cache_once_per_cgroup(tmp_path: Path) -> None:
    """Thousands of refusals from a few cgroups: each distinct id tuple is looked up once per
    batch, and every occurrence still gets its own cgroup's facts with its keys sorted."""
    uid, cid = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f", "c" * 64
    roots = {h: tmp_path / h for h in ("unified", "memory", "cpu")}
    for r in roots.values():
        r.mkdir()
    pod = roots["unified"] / "kubepods.slice" / f"kubepods-pod{uid.replace('-', '_')}.slice"
    ctr = pod / f"cri-containerd-{cid}.scope"
    ctr.mkdir(parents=True)
    host = os.stat(roots["unified"]).st_ino
    in_pod = os.stat(ctr).st_ino
    obs = NetworkObserver(ObserverContext(boot_offset_ns=BOOT))
    recs = [
        record(cgroup_id=in_pod if i % 3 else host, memcg_id=0, cpu_cgroup_id=0, sport=1000 + i)
        for i in range(600)
    ]
    batch = obs.classify(NETWORK_EVENT.framed(*recs))
    resolver = CgroupResolver(roots)
    calls: list[tuple[str, int]] = []
    lookup = resolver.lookup

    def counted(h: str, c: int) -> object:
        calls.append((h, c))
        return lookup(h, c)

    resolver.lookup = counted  # type: ignore[method-assign,assignment]
    anyio.run(Enricher.for_specs([NetworkObserver.enrichment], resolver).enrich, batch)
    # Two distinct id tuples: the batch scan, the walk's re-check and the memo's completeness
    # check ask for each at most a few times, however many occurrences carry it (600 here).
    assert len([c for c in calls if c[1] in (host, in_pod)]) <= 2 * 4
    assert len(batch) == 600
    for i, occ in enumerate(batch):
        d = occ.data
        assert d is not None and list(d) == sorted(d), list(d or ())
        assert d["src_port"] == 1000 + i
        if i % 3:
            assert (d["container_id"], d["pod_uid"], d["cgroup_id"]) == (cid, uid, in_pod)
            assert d["cgroup_path"] == f"/{ctr.relative_to(roots['unified'])}"
        else:
            assert d["cgroup_path"] == "/" and "container_id" not in d
