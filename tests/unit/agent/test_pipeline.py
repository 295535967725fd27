"""The pipeline's own stages: classification drops, enrichment off the event loop, and fan-out
that never waits for a sink (a stalled sink's lane fills and its drops are counted)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tapio.agent.pipeline import (
    LANE_FULL,
    Enricher,
    PipelineStats,
    RunningObserver,
    SinkLane,
    classify_loop,
    fanout_loop,
)
from tapio.bpf.ringbuf import Drainer
from tapio.metrics import REGISTRY
from tapio.observers.base import ObserverContext
from tapio.observers.cgroups import ByCgroupId, CgroupResolver, scan_tree
from tapio.observers.network import EV_CONN_REFUSED, NETWORK_EVENT, NetworkObserver
from tapio.occurrence import Occurrence, new_occurrence
from tapio.sinks.base import Batch, Sink


class StalledSink(Sink):
    name = "stalled-test"

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        await self.release.wait()
        async with batches:
            async for _ in batches:
                pass


class CollectingSink(Sink):
    name = "collect-test"

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Sequence[Occurrence]] = []

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        async with batches:
            async for b in batches:
                self.got.append(b)


async def test_stalled_sink_drops_are_counted_and_others_get_everything() -> None:
    stalled, good = StalledSink(), CollectingSink()
    occ = new_occurrence("kernel.network.connection_refused", "warning", "failure")
    in_send, in_recv = anyio.create_memory_object_stream[Batch](100)
    lanes = []
    async with anyio.create_task_group() as tg:
        for sink, size in ((stalled, 2), (good, 100)):
            s, r = anyio.create_memory_object_stream[Batch](size)
            lanes.append(SinkLane(sink, s))
            tg.start_soon(sink.run, r)
        tg.start_soon(fanout_loop, in_recv, lanes)
        with anyio.fail_after(5):
            async with in_send:
                for _ in range(50):
                    await in_send.send([occ, occ])
            while len(good.got) < 50:
                await anyio.sleep(0.01)
        stalled.release.set()
    assert len(good.got) == 50
    assert stalled.stats.dropped_total == 2 * 48  # two batches fit its stream


def sink_drops(sink: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("tapio_sink_drops_total", {"sink": sink, "reason": reason}) or 0.0
    )


def observer_drops(observer: str, reason: str) -> float:
    labels = {"observer": observer, "reason": reason}
    return REGISTRY.get_sample_value("tapio_observer_drops_total", labels) or 0.0


async def test_a_full_fanout_lane_is_its_own_drop_reason() -> None:
    """The lane into a sink and a sink's own buffer are different queues: different reasons
    (``queue_full`` for the lane, ``buffer_full`` for the buffer)."""
    stalled = StalledSink()
    before = sink_drops(stalled.name, "queue_full"), sink_drops(stalled.name, "buffer_full")
    occ = new_occurrence("kernel.network.connection_refused", "warning", "failure")
    in_send, in_recv = anyio.create_memory_object_stream[Batch](10)
    s, r = anyio.create_memory_object_stream[Batch](1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stalled.run, r)
        tg.start_soon(fanout_loop, in_recv, [SinkLane(stalled, s)])
        async with in_send:
            for _ in range(4):
                await in_send.send([occ])
        with anyio.fail_after(5):
            while sink_drops(stalled.name, LANE_FULL) - before[0] < 3:
                await anyio.sleep(0.01)
        stalled.release.set()
    assert LANE_FULL == "queue_full"
    assert sink_drops(stalled.name, "queue_full") - before[0] == 3
    assert sink_drops(stalled.name, "buffer_full") == before[1]


class FlakyObserver(NetworkObserver):
    """A network observer whose classifier raises on the first payload."""

    calls = 0

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("classifier bug")
        return super().classify(payload)


def network_record(event_type: int) -> bytes:
    values: dict[str, Any] = {n: 0 for n, _ in NETWORK_EVENT.fields}
    values.update(event_type=event_type, family=2, comm=b"curl", saddr=bytes(16), daddr=bytes(16))
    return NETWORK_EVENT.struct.pack(
        *(values[n] for n, _ in NETWORK_EVENT.fields if not n.startswith("_"))
    )


async def test_classifier_errors_and_unknown_record_types_are_counted_drops() -> None:
    obs = FlakyObserver(ObserverContext(boot_offset_ns=0))
    ro = RunningObserver(obs, None, None)
    before_err = observer_drops("network", "classifier_error")
    before_unknown = observer_drops("network", "unknown_record_type")
    before_malformed = (
        REGISTRY.get_sample_value("tapio_malformed_events_total", {"observer": "network"}) or 0.0
    )
    refused = network_record(EV_CONN_REFUSED)
    p_send, p_recv = anyio.create_memory_object_stream[bytes](4)
    b_send, b_recv = anyio.create_memory_object_stream[Batch](4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(classify_loop, ro, p_recv, b_send, PipelineStats())
        async with p_send:
            await p_send.send(NETWORK_EVENT.framed(refused, refused, refused))  # raises
            await p_send.send(NETWORK_EVENT.framed(network_record(99), refused))
        got = [b async for b in b_recv]
    assert [len(b) for b in got] == [1]  # the second payload's refusal; the unknown is dropped
    assert observer_drops("network", "classifier_error") - before_err == 3
    assert observer_drops("network", "unknown_record_type") - before_unknown == 1
    malformed = REGISTRY.get_sample_value("tapio_malformed_events_total", {"observer": "network"})
    assert (malformed or 0.0) == before_malformed  # a classifier bug is not a malformed record


class TimedDrainer(Drainer):
    """The agent's drainer with its ring pass replaced by a clock reading: its drain timer."""

    def __init__(self, interval: float) -> None:
        super().__init__([], interval, 1)
        self.ticks: list[float] = []

    async def drain_once(self, senders: dict[str, MemoryObjectSendStream[bytes]]) -> bool:
        self.ticks.append(time.monotonic())
        return False


async def test_a_cgroup_lookup_miss_does_not_block_the_drain_timer(tmp_path: Path) -> None:
    """A slow hierarchy walk (0.6 s) runs in a worker thread: the 20 ms drain timer stays on
    time meanwhile, the occurrence still gets its cgroup path, and the miss is counted."""
    unified = tmp_path / "unified"
    cg = unified / "system.slice" / "web.service"
    cg.mkdir(parents=True)

    def slow_scan(root: Path, limit: int) -> list[tuple[int, str]]:
        time.sleep(0.6)  # blocking, like a walk of tens of thousands of cgroup directories
        return scan_tree(root, limit)

    resolver = CgroupResolver({"unified": unified}, scan=slow_scan)
    enricher = Enricher(
        resolver,
        {"kernel.container.abnormal_exit": ByCgroupId(("unified",), ("unified",))},
        watch=False,  # no inotify: the cgroup must be found by the (slow) walk under test
    )
    occ = new_occurrence(
        "kernel.container.abnormal_exit",
        "warning",
        "failure",
        data={"cgroup2_id": os.stat(cg).st_ino, "pid": 1},
    )
    misses = REGISTRY.get_sample_value("tapio_cgroup_lookups_total", {"result": "miss"}) or 0.0
    drainer = TimedDrainer(0.02)
    lane_send, lane_recv = anyio.create_memory_object_stream[Batch](4)
    sink = CollectingSink()
    in_send, in_recv = anyio.create_memory_object_stream[Batch](4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drainer.run, {})
        tg.start_soon(sink.run, lane_recv)
        tg.start_soon(fanout_loop, in_recv, [SinkLane(sink, lane_send)], enricher)
        await anyio.sleep(0.1)
        started = time.monotonic()
        async with in_send:
            await in_send.send([occ])
        with anyio.fail_after(5):
            while not sink.got:
                await anyio.sleep(0.005)
        finished = time.monotonic()
        drainer.scope.cancel()
    assert finished - started >= 0.6  # the walk really was slow ...
    during = [t for t in drainer.ticks if started <= t <= finished]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    # ... and the 20 ms timer kept ticking through it (an inline walk gives one 0.6 s gap; the
    # bounds leave room for a loaded CI machine).
    assert len(during) >= 10 and max(gaps) < 0.4, gaps
    [[got]] = sink.got
    assert got.data is not None and got.data["cgroup_path"] == "/system.slice/web.service"
    assert got.data["container_id"] == "web.service"
    after = REGISTRY.get_sample_value("tapio_cgroup_lookups_total", {"result": "miss"})
    assert (after or 0.0) - misses == 1
    assert resolver.walks == 1
