"""``file:///dir`` output: occurrences as JSON lines, rotated by size, bounded in file count.

The current file is ``<dir>/evidence.jsonl``. When a write would take it past ``max_bytes`` it
is renamed to ``evidence-<UTC time>-<n>.jsonl`` and a new one is started; only the newest
``max_files`` rotated files are kept (oldest removed first), so the directory is bounded.

A chunk is written with one ``write`` and ``fsync``-ed before it counts as delivered. A failed
write (disk full) is truncated back to the last complete line, so a retry never leaves a torn
line or a duplicate. Ids written recently are remembered (bounded), so an agent's re-sent batch
is not written twice either.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from yarl import URL

from tapio.controller.forward.record import Record

CURRENT: Final = "evidence.jsonl"
DEFAULT_MAX_BYTES: Final = 64 << 20
DEFAULT_MAX_FILES: Final = 8
RECENT_IDS: Final = 65_536


class FileOutput:
    def __init__(
        self, url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_files: int = DEFAULT_MAX_FILES
    ) -> None:
        parsed = URL(url)
        if parsed.scheme != "file" or parsed.host not in (None, "", "localhost") or not parsed.path:
            raise ValueError(f"not a file:///DIR URL: {url}")
        if max_bytes < 1 or max_files < 1:
            raise ValueError("file output max_bytes and max_files must be >= 1")
        self.directory = Path(parsed.path)
        self.name = f"file://{self.directory}"
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._rotations = 0
        self.skipped_duplicates = 0

    @property
    def current(self) -> Path:
        return self.directory / CURRENT

    async def connect(self) -> None:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)

    async def deliver(self, records: Sequence[Record]) -> list[bool]:
        fresh = [r for r in records if r.id not in self._recent]
        self.skipped_duplicates += len(records) - len(fresh)
        if fresh:
            await asyncio.to_thread(self._write, b"".join(r.body + b"\n" for r in fresh))
            for r in fresh:
                self._recent[r.id] = None
            while len(self._recent) > RECENT_IDS:
                self._recent.popitem(last=False)
        return [True] * len(records)

    def _write(self, data: bytes) -> None:
        fd = os.open(self.current, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.max_bytes:
                os.close(fd)
                fd = -1
                self._rotate()
                fd = os.open(
                    self.current, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
                )
                size = 0
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no torn line for the retry to append after
                raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _rotate(self) -> None:
        self._rotations += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        os.rename(self.current, self.directory / f"evidence-{stamp}-{self._rotations}.jsonl")
        rotated = sorted(
            (p for p in self.directory.glob("evidence-*.jsonl")), key=lambda p: p.stat().st_mtime_ns
        )
        for old in rotated[: max(0, len(rotated) - self.max_files)]:
            old.unlink(missing_ok=True)

    async def close(self) -> None:
        return None
