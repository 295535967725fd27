"""Fan-out never waits for a sink: a stalled sink's stream fills and drops are counted."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from tapio.agent.pipeline import SinkLane, fanout_loop
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
