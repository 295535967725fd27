"""The bytes of the stdout line for a fixed set of network records, pinned.

Classification, enrichment and encoding are tuned for speed again and again; none of that may
change a single byte of the evidence. The record set covers every TCP type, both families, a
refusal by RST and by ICMP, a record of unknown type (dropped), an undecodable comm, unknown
errno and state values, a socket without a connector, and cgroup ids that name a pod in the v1
cpu tree, a pod in the unified tree and nothing at all. The ids are inode numbers of a temporary
tree, so the pinned text holds tokens for them (``@NAME@``); the randomness of the ids is a
fixed byte stream, so the ids are pinned too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest

import tapio.occurrence as occurrence
from tapio.agent.pipeline import Enricher
from tapio.observers.base import ObserverContext
from tapio.observers.cgroups import CgroupResolver
from tapio.observers.network import NETWORK_EVENT, NetworkObserver
from tapio.occurrence import encode_lines

from .test_network import BOOT, V6_DST, V6_SRC, record

GOLDEN = Path(__file__).parent / "data" / "network_golden.jsonl"
UID = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f"
CID_V1, CID_V2 = "b" * 64, "c" * 64


def tree(tmp: Path) -> dict[str, int]:
    """A hybrid host's three hierarchies with a pod in the cpu tree and one in the unified
    tree; the inode numbers by token name."""
    roots = {h: tmp / h for h in ("unified", "memory", "cpu")}
    v1 = roots["cpu"] / "kubepods" / "burstable" / f"pod{UID}" / CID_V1
    slice_ = f"kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice"
    v2 = roots["unified"] / slice_ / f"cri-containerd-{CID_V2}.scope"
    v1.mkdir(parents=True)
    v2.mkdir(parents=True)
    roots["memory"].mkdir()
    ino = {f"{h.upper()}_ROOT": os.stat(p).st_ino for h, p in roots.items()}
    ino |= {"POD_V1": os.stat(v1).st_ino, "POD_V2": os.stat(v2).st_ino}
    return ino


def records(ino: dict[str, int]) -> list[bytes]:
    host = {
        "cgroup_id": ino["UNIFIED_ROOT"],
        "memcg_id": ino["MEMORY_ROOT"],
        "cpu_cgroup_id": ino["CPU_ROOT"],
    }
    in_v1 = host | {"cpu_cgroup_id": ino["POD_V1"]}
    in_v2 = host | {"cgroup_id": ino["POD_V2"]}
    none = {"pid_source": 0, "pid": 0, "tid": 0, "cgroup_id": 0, "memcg_id": 0, "cpu_cgroup_id": 0}
    v6 = {"family": 10, "saddr": V6_SRC, "daddr": V6_DST}
    return [
        record(**in_v1),
        record(**in_v2, flags=0, sport=40001, timestamp_ns=6_000_000_000),
        record(**v6, **host, dport=443, duration_ns=0),
        record(event_type=99),
        record(**none, comm=b"\xff\xfe".ljust(16, b"\0")),
        record(event_type=2, sk_err=110, flags=0, duration_ns=3_000_000_000, **in_v2),
        record(event_type=2, sk_err=7, old_state=99, new_state=0, **v6, **none),
        record(event_type=3, retrans_count=9, total_retrans=31, snd_cwnd=4, **in_v1),
        record(
            event_type=4,
            rtt_baseline_us=1500,
            rtt_current_us=25_250,
            rtt_samples=8,
            **v6,
            **none,
        ),
        record(timestamp_ns=6_000_000_000, sport=40002, **in_v2),
    ]


def stream(n: int) -> bytes:
    """A fixed stand-in for ``os.urandom``: the ids are then the same in every run."""
    return random.Random(13).randbytes(n)


def lines(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, dict[str, int]]:
    ino = tree(tmp)
    monkeypatch.setattr(occurrence.os, "urandom", stream)
    monkeypatch.setattr(occurrence, "_ulid", occurrence._UlidState())
    obs = NetworkObserver(ObserverContext(boot_offset_ns=BOOT))
    batch = obs.classify(NETWORK_EVENT.framed(*records(ino)))
    roots = {h: tmp / h for h in ("unified", "memory", "cpu")}
    enricher = Enricher.for_specs([NetworkObserver.enrichment], CgroupResolver(roots))
    anyio.run(enricher.enrich, batch)
    return encode_lines(batch), ino


def test_the_stdout_lines_of_a_fixed_record_set_are_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, ino = lines(tmp_path, monkeypatch)
    expected = GOLDEN.read_text(encoding="utf-8")
    for name, value in ino.items():
        expected = expected.replace(f"@{name}@", str(value))
    assert out.decode("utf-8") == expected


def test_one_record_classified_alone_has_the_same_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``classify_one`` (one frame) and the batch path build the same occurrence."""
    ino = tree(tmp_path)
    obs = NetworkObserver(ObserverContext(boot_offset_ns=BOOT))
    for raw in records(ino):
        monkeypatch.setattr(occurrence, "_ulid", occurrence._UlidState())
        monkeypatch.setattr(occurrence.os, "urandom", stream)
        [frame] = NETWORK_EVENT.iter_frames(NETWORK_EVENT.framed(raw))
        one = obs.classify_one(frame, BOOT)
        monkeypatch.setattr(occurrence, "_ulid", occurrence._UlidState())
        batch = obs.classify(NETWORK_EVENT.framed(raw))
        assert (encode_lines([one]) if one is not None else b"") == encode_lines(batch)


def write_golden(tmp: Path) -> None:  # pragma: no cover - run by hand to re-pin deliberately
    with pytest.MonkeyPatch.context() as mp:
        out, ino = lines(tmp, mp)
    text = out.decode("utf-8")
    for name, value in sorted(ino.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(f":{value},", f":@{name}@,")
    GOLDEN.write_text(text, encoding="utf-8")
