"""The file:// output and the lane engine without a network: rotation, bounded files, no torn
line after a failed write, no duplicate for a re-sent id, all-or-nothing admission."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from tapio import wire
from tapio.controller.forward import Forwarder, ForwardSettings, build_output
from tapio.controller.forward.file import CURRENT, FileOutput
from tapio.controller.forward.record import Record, build_records, subject_for
from tapio.controller.metrics import ControllerMetrics

from .ctl_harness import batch, capturing_logger, event


def records(first: int, n: int, size: int = 10) -> list[Record]:
    return [
        Record(f"id-{i}", "kernel.a.b", "n", b'{"i":%d,"pad":"%s"}' % (i, b"x" * size))
        for i in range(first, first + n)
    ]


async def test_rotation_keeps_at_most_max_files(tmp_path: Path) -> None:
    out = FileOutput(f"file://{tmp_path}", max_bytes=200, max_files=2)
    await out.connect()
    for k in range(12):
        assert await out.deliver(records(k * 3, 3, size=20)) == [True] * 3
    rotated = sorted(p.name for p in tmp_path.glob("evidence-*.jsonl"))
    assert len(rotated) == 2
    assert (tmp_path / CURRENT).stat().st_size <= 200
    kept = [
        msgspec.json.decode(line)["i"]
        for p in sorted(tmp_path.glob("*.jsonl"))
        for line in p.read_bytes().splitlines()
    ]
    assert len(kept) == len(set(kept)) and max(kept) == 35


async def test_resent_ids_are_not_written_twice(tmp_path: Path) -> None:
    out = FileOutput(f"file://{tmp_path}")
    await out.connect()
    await out.deliver(records(0, 5))
    await out.deliver(records(3, 5))
    lines = (tmp_path / CURRENT).read_bytes().splitlines()
    assert [msgspec.json.decode(x)["i"] for x in lines] == list(range(8))
    assert out.skipped_duplicates == 2


async def test_failed_write_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = FileOutput(f"file://{tmp_path}")
    await out.connect()
    await out.deliver(records(0, 2))
    real_write = os.write
    calls = {"n": 0}

    def short_then_enospc(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_enospc)
    with pytest.raises(OSError):
        await out.deliver(records(2, 3))
    monkeypatch.setattr(os, "write", real_write)
    await out.deliver(records(2, 3))  # the lane's retry
    lines = (tmp_path / CURRENT).read_bytes().splitlines()
    assert [msgspec.json.decode(x)["i"] for x in lines] == [0, 1, 2, 3, 4]


class Stuck:
    """An output that never connects (an unreachable downstream)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def connect(self) -> None:
        raise ConnectionRefusedError("down")

    async def deliver(self, records: Sequence[Record]) -> list[bool]:
        raise AssertionError("never connected")

    async def close(self) -> None:
        return None


async def test_offer_is_all_or_nothing_across_outputs(tmp_path: Path) -> None:
    log, _ = capturing_logger()
    metrics = ControllerMetrics()
    good = FileOutput(f"file://{tmp_path}")
    fwd = Forwarder([good, Stuck("stuck")], metrics, log, queue_max_events=10, drain_grace=0.3)
    fwd.start()
    assert fwd.offer(records(0, 6))
    await asyncio.sleep(0.2)
    assert len(fwd.lanes[0]) == 0 and len(fwd.lanes[1]) == 6  # file delivered, stuck holds
    assert not fwd.offer(records(6, 5))  # the stuck lane has room for 4 only: nobody takes it
    assert len(fwd.lanes[1]) == 6
    assert fwd.offer(records(6, 4))
    assert fwd.reachability() == {good.name: True, "stuck": False} and not fwd.ready
    assert await fwd.drain() == 10
    assert metrics.forward_dropped.labels("stuck", "shutdown")._value.get() == 10
    assert metrics.forward_forwarded.labels(good.name)._value.get() == 10
    assert len((tmp_path / CURRENT).read_bytes().splitlines()) == 10


def test_records_from_a_batch() -> None:
    raw = batch(
        events=[
            event(
                facts={
                    "occurrence_id": "01ABC",
                    "outcome": "failure",
                    "error_code": "ECONNREFUSED",
                    "error_message": "refused",
                    "dst_port": 5,
                }
            ),
            event(facts={"dst_port": 6}),
        ]
    )
    decoded = wire.decode(msgspec.json.encode(raw), wire.EventBatchRequest)
    first, second = build_records(decoded)
    doc = msgspec.json.decode(first.body)
    assert first.id == "01ABC" and doc["id"] == "01ABC"
    assert doc["error"] == {"code": "ECONNREFUSED", "message": "refused"}
    assert doc["data"] == {"dst_port": 5}
    assert list(doc)[:3] == ["id", "timestamp", "timestamp_unix_nanos"]
    assert doc["timestamp"] == "2023-11-14T22:13:20.000000000+00:00"
    # without an occurrence id: a content key, the same for the same event (a re-sent batch)
    assert second.id.startswith("sha256-") and build_records(decoded)[1].id == second.id
    assert msgspec.json.decode(second.body)["outcome"] == "unknown"
    assert (
        subject_for("kernel.network.connection_refused")
        == "tapio.evidence.kernel.network.connection_refused"
    )


def test_build_output_rejects_unknown_schemes() -> None:
    s = ForwardSettings()
    for url, message in [
        ("http://x", "unsupported --forward scheme http://"),
        ("file://host/dir", "not a file:///DIR URL"),
        ("nats://", "not a nats://HOST:PORT URL"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_output(url, s)
