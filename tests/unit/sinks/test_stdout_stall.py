"""The stdout sink writes on the event loop without ever blocking it.

A pipe whose reader stalls must not freeze the loop (the ring buffers are drained on it): the
sink waits for writability, the loop keeps running, and every line arrives, in order and whole,
once the reader reads again. The pipe's blocking mode is restored when the sink stops.
"""

from __future__ import annotations

import json
import os

import anyio

from tapio.sinks.stdout import StdoutSink

from .conftest import occ, running, writes


async def test_stalled_pipe_reader_never_blocks_the_loop_and_loses_nothing() -> None:
    r, w = os.pipe()
    n = 400  # about 100 KiB of lines: several times a pipe's 64 KiB
    ok0 = writes("stdout", "ok")
    ticks = 0
    try:
        with os.fdopen(w, "wb") as stream:
            sink = StdoutSink(stream)
            assert not os.get_blocking(w)

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await anyio.sleep(0.005)
                    ticks += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                async with running(sink) as send:
                    await send.send([occ(i, pad="x" * 200) for i in range(n)])
                    await anyio.sleep(0.3)  # nobody reads: the pipe is full
                    stalled_ticks = ticks
                    assert stalled_ticks >= 20  # the loop kept running while the sink waited
                    assert writes("stdout", "ok") == ok0  # and nothing was counted yet
                    data = bytearray()
                    with anyio.fail_after(10):
                        while data.count(b"\n") < n:
                            await anyio.wait_readable(r)
                            data += os.read(r, 1 << 16)
                tg.cancel_scope.cancel()
            assert os.get_blocking(w)  # restored once the sink stopped
        lines = bytes(data).splitlines()
        assert [json.loads(line)["data"]["seq"] for line in lines] == list(range(n))
        assert writes("stdout", "ok") - ok0 == n
    finally:
        os.close(r)


async def test_regular_file_is_written_directly(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "out.jsonl")
    with open(path, "wb") as stream:
        async with running(StdoutSink(stream)) as send:
            await send.send([occ(0), occ(1)])
            await send.send([occ(2)])
        assert os.get_blocking(stream.fileno())
    with open(path, "rb") as f:
        assert [json.loads(line)["data"]["seq"] for line in f] == [0, 1, 2]
