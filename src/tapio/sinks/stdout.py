"""stdout sink: compact JSON lines.

Writes happen in a worker thread, one ``write`` per batch: a stdout pipe whose reader stalls
blocks that thread, never the event loop that drains the ring buffers (the agent's bounded
per-sink stream then counts ``queue_full`` drops). A failed write (a closed pipe, ``EIO``) counts
the lines it completed as written and the rest as ``write_error`` drops.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

import anyio.to_thread

from tapio.occurrence import encode_lines
from tapio.sinks.base import Batch, BatchWriterSink, SinkError


class StdoutSink(BatchWriterSink):
    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        super().__init__()
        self._fd = (stream or sys.stdout.buffer).fileno()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            # One line per occurrence: the completed lines were delivered, the rest were not.
            raise SinkError(str(exc), written=data.count(b"\n", 0, done)) from exc

    async def write(self, batch: Batch) -> None:
        data = encode_lines(list(batch))
        await anyio.to_thread.run_sync(self._write_all, data, abandon_on_cancel=True)
