"""A failed sink write is a counted drop (``reason="write_error"``), per occurrence, truthfully.

Every sink here is made to fail for real (a pipe with no reader, a write that raises ENOSPC
part-way through a batch, a handler that raises) and the test reads the counters the agent
exports: what was written counts ``ok``, what was not counts ``err`` and
``tapio_sink_drops_total{reason="write_error"}``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from tapio.occurrence import Occurrence, encode_lines
from tapio.sinks.base import Batch, SinkError
from tapio.sinks.file import FileSink, FileSinkSettings
from tapio.sinks.memory import MemorySink
from tapio.sinks.stdout import CHUNK, StdoutSink

from .conftest import drops, occ, running, writes


class Counters:
    """ok / err / write_error deltas of one sink label (the registry is process-wide)."""

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self.base = self._now()

    def _now(self) -> tuple[float, float, float]:
        return (
            writes(self.sink, "ok"),
            writes(self.sink, "err"),
            drops(self.sink, "write_error"),
        )

    def delta(self) -> dict[str, float]:
        now = self._now()
        deltas = (n - b for n, b in zip(now, self.base, strict=True))
        return dict(zip(("ok", "err", "write_error"), deltas, strict=True))


async def feed(sink: Any, *batches: Batch) -> None:
    async with running(sink) as send:
        for b in batches:
            await send.send(b)


async def test_stdout_write_to_a_closed_pipe_is_a_write_error_drop() -> None:
    r, w = os.pipe()
    os.close(r)  # no reader: every write fails with EPIPE
    counters = Counters("stdout")
    with os.fdopen(w, "wb") as stream:
        sink = StdoutSink(stream)
        await feed(sink, [occ(0), occ(1), occ(2)], [occ(3)])
    assert counters.delta() == {"ok": 0, "err": 4, "write_error": 4}
    assert sink.stats.dropped_total == 4 and sink.stats.ok_total == 0


async def test_stdout_partial_write_counts_the_completed_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, w = os.pipe()
    real_write = os.write
    calls = 0

    def short_then_fail(fd: int, data: Any) -> int:
        nonlocal calls
        if fd != w:  # os.write is patched process-wide: only the sink's pipe misbehaves
            return real_write(fd, data)
        calls += 1
        if calls == 1:  # the first line and half of the second one
            first = bytes(data).index(b"\n") + 1
            return real_write(fd, bytes(data)[: first + 5])
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr("tapio.sinks.stdout.os.write", short_then_fail)
    counters = Counters("stdout")
    try:
        with os.fdopen(w, "wb") as stream:
            await feed(StdoutSink(stream), [occ(0), occ(1), occ(2)])
        assert counters.delta() == {"ok": 1, "err": 2, "write_error": 2}
    finally:
        os.close(r)


async def test_stdout_spill_is_written_in_chunks_and_a_failure_counts_the_earlier_chunks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A batch larger than one chunk is written in several writes, in order; a write that
    fails in the second chunk counts the whole first chunk plus the second's completed lines."""
    path = tmp_path / "out.jsonl"
    real_write = os.write
    calls = 0
    fd_out = -1

    def fail_in_second_chunk(fd: int, data: Any) -> int:
        nonlocal calls
        if fd != fd_out:
            return real_write(fd, data)
        calls += 1
        if calls == 1:
            return real_write(fd, data)
        if calls == 2:  # the second chunk: one line and a bit of the next, then the disk is full
            first = bytes(data).index(b"\n") + 1
            return real_write(fd, bytes(data)[: first + 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    n = CHUNK + 10
    counters = Counters("stdout")
    with path.open("wb") as stream:
        fd_out = stream.fileno()
        monkeypatch.setattr("tapio.sinks.stdout.os.write", fail_in_second_chunk)
        await feed(StdoutSink(stream), [occ(i) for i in range(n)])
    assert calls == 3
    assert counters.delta() == {"ok": CHUNK + 1, "err": 9, "write_error": 9}
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == CHUNK + 2 and lines[0] and lines[CHUNK]  # whole lines, then a tail

    monkeypatch.setattr("tapio.sinks.stdout.os.write", real_write)
    whole = tmp_path / "whole.jsonl"
    batch = [occ(i) for i in range(n)]
    with whole.open("wb") as stream:
        await feed(StdoutSink(stream), batch)
    assert whole.read_bytes() == encode_lines(batch)


def _tmp_files(d: Path) -> list[Path]:
    return list(d.glob(".*.tmp"))


async def test_file_sink_on_a_full_disk_counts_written_and_dropped_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, real_open = os.write, os.open
    state = {"full": False, "calls": 0}
    ours: set[int] = set()  # os.* is patched process-wide: only the sink's files misbehave

    def tracking_open(path: Any, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if str(path).startswith(str(tmp_path)):
            ours.add(fd)
        return fd

    def enospc_after_two(fd: int, data: Any) -> int:
        if fd not in ours:
            return real_write(fd, data)
        state["calls"] += 1
        if state["full"] or state["calls"] > 2:
            state["full"] = True
            # A full disk accepts part of the data, then refuses the rest.
            real_write(fd, bytes(data)[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("tapio.sinks.file.os.open", tracking_open)
    monkeypatch.setattr("tapio.sinks.file.os.write", enospc_after_two)
    sink = FileSink(tmp_path, FileSinkSettings())
    counters = Counters("file")
    first = [occ(i) for i in range(5)]
    async with running(sink) as send:
        await send.send(first)
        with anyio.fail_after(5):
            while sink.stats.ok_total + sink.stats.dropped_total < 5:
                await anyio.sleep(0.01)
        assert counters.delta() == {"ok": 2, "err": 3, "write_error": 3}
        assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(
            f"{o.id}.json" for o in first[:2]
        )
        assert _tmp_files(tmp_path) == []
        # Space returns: the same sink writes again, nothing was lost from its bookkeeping.
        monkeypatch.setattr("tapio.sinks.file.os.write", real_write)
        await send.send([occ(10), occ(11)])
    assert counters.delta() == {"ok": 4, "err": 3, "write_error": 3}
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert _tmp_files(tmp_path) == []


async def test_file_sink_replace_failure_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr("tapio.sinks.file.os.replace", refuse)
    counters = Counters("file")
    await feed(FileSink(tmp_path, FileSinkSettings()), [occ(0), occ(1)])
    assert counters.delta() == {"ok": 0, "err": 2, "write_error": 2}
    assert list(tmp_path.iterdir()) == []


async def test_memory_sink_handler_failure_is_a_write_error_drop() -> None:
    def flaky(batch: Batch) -> None:
        if any(o.data and o.data["seq"] == 1 for o in batch):
            raise OSError("receiver gone")

    sink = MemorySink(flaky, label="memory-fail-test")
    counters = Counters("memory-fail-test")
    await feed(sink, [occ(0)], [occ(1), occ(2)], [occ(3)])
    assert counters.delta() == {"ok": 2, "err": 2, "write_error": 2}
    assert [o.data["seq"] for o in sink.occurrences if o.data] == [0, 3]
    assert sink.closed


async def test_memory_sink_partial_write_keeps_the_written_prefix() -> None:
    async def half(batch: Batch) -> None:
        await anyio.sleep(0)
        raise SinkError("half of it", written=len(batch) // 2)

    sink = MemorySink(half, label="memory-partial-test")
    counters = Counters("memory-partial-test")
    batch: list[Occurrence] = [occ(i) for i in range(4)]
    await feed(sink, batch)
    assert counters.delta() == {"ok": 2, "err": 2, "write_error": 2}
    assert sink.occurrences == batch[:2]


async def test_memory_sink_hold_stalls_consumption_until_released() -> None:
    hold = anyio.Event()
    sink = MemorySink(hold=hold, label="memory-hold-test")
    async with running(sink, buffer=2) as send:
        send.send_nowait([occ(0)])
        send.send_nowait([occ(1)])
        with pytest.raises(anyio.WouldBlock):
            send.send_nowait([occ(2)])  # nothing consumed: the stream is full
        hold.set()
        assert [o.data["seq"] for o in await sink.wait_for(2) if o.data] == [0, 1]
