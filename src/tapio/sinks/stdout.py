"""stdout sink: compact JSON lines.

Every batch is one ``encode_lines`` call and one ``write`` (a larger spill: one per ``CHUNK``
occurrences, with a checkpoint between them) done on the event loop itself: no
thread hand-off per batch (a worker thread costs a condition-variable round trip and a GIL
switch for every batch, more than encoding the batch). A pipe, FIFO, socket or terminal is put
in non-blocking mode, so a reader that stalls never blocks the loop that drains the ring
buffers: the sink waits for the fd's writability instead, its bounded stream fills, and the
fan-out counts ``queue_full`` drops. The blocking mode is restored when the sink closes, since
the open file description may be shared with the parent. A regular file or ``/dev/null`` is
written directly (the kernel never makes those wait for a reader).

A failed write (a closed pipe, ``EIO``) counts the lines it completed as written and the rest as
``write_error`` drops.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from typing import BinaryIO

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from tapio.occurrence import encode_lines
from tapio.sinks.base import Batch, BatchWriterSink, SinkError

#: Occurrences encoded and written per step: a sink lane's spill (up to 65,536 occurrences) is
#: written in steps of this many with a checkpoint between them, so the drainer gets the loop
#: between two steps instead of after the whole spill (its ring keeps filling meanwhile).
CHUNK = 4096


def _may_block(fd: int) -> bool:
    """Whether a write to ``fd`` can wait on a reader (pipe, FIFO, socket, terminal)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


class StdoutSink(BatchWriterSink):
    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        super().__init__()
        self._fd = (stream or sys.stdout.buffer).fileno()
        self._restore_blocking = False
        if _may_block(self._fd) and os.get_blocking(self._fd):
            os.set_blocking(self._fd, False)
            self._restore_blocking = True

    async def write(self, batch: Batch) -> None:
        items = batch if isinstance(batch, list | tuple) else list(batch)
        written = 0
        for start in range(0, len(items), CHUNK):
            if start:  # a spill of many batches must not hold the loop the drainer runs on
                await anyio.lowlevel.checkpoint()
            chunk = items[start : start + CHUNK] if len(items) > CHUNK else items
            await self._write(encode_lines(chunk), written)
            written += len(chunk)

    async def _write(self, data: bytes, written: int) -> None:
        """Write ``data`` whole; ``written`` occurrences of the batch were delivered before."""
        fd = self._fd
        done = 0
        size = len(data)
        view = memoryview(data)
        try:
            while True:
                try:
                    done += os.write(fd, view[done:] if done else data)
                except BlockingIOError:
                    await anyio.wait_writable(fd)
                    continue
                if done >= size:
                    return
        except OSError as exc:
            # One line per occurrence: the completed lines were delivered, the rest were not.
            raise SinkError(str(exc), written=written + data.count(b"\n", 0, done)) from exc
        finally:
            view.release()

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        try:
            await super().run(batches)
        finally:  # cancelled at shutdown too: leave the shared description as it was found
            self._restore()

    def _restore(self) -> None:
        if self._restore_blocking:
            self._restore_blocking = False
            with contextlib.suppress(OSError):  # the fd is gone already: nothing to restore
                os.set_blocking(self._fd, True)
