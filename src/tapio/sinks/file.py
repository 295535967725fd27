"""File sink: one pretty JSON file per occurrence, written atomically, with bounded retention.

Each occurrence becomes ``<data_dir>/<id>.json`` via a ``.<id>.json.tmp`` file and
``os.replace``, so a reader (``tapio watch``) never sees a partial file. Retention keeps at most
``max_files`` files and ``max_bytes`` bytes, deleting oldest first; ULID names sort by time, so
"oldest" is the smallest name. I/O runs in a worker thread, never on the event loop.

A write that fails (``ENOSPC`` on a full filesystem, ``EIO``) removes its temporary file, so a
full disk never fills up further with empty temporaries. Every occurrence of a batch is tried
(a smaller one may still fit): those written count as written, the others as ``write_error``
drops, and every later batch is tried again, so the sink resumes by itself when space returns.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio.to_thread
import msgspec
import structlog

from tapio.occurrence import encode_pretty
from tapio.sinks.base import Batch, BatchWriterSink, SinkError

log = structlog.get_logger("tapio.sinks.file")


class FileSinkSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_files: int = 10_000
    max_bytes: int = 256 * 1024 * 1024


class FileSink(BatchWriterSink):
    name = "file"

    def __init__(self, data_dir: str | os.PathLike[str], settings: FileSinkSettings) -> None:
        super().__init__()
        if settings.max_files < 1 or settings.max_bytes < 1:
            raise ValueError("file sink retention bounds must be positive")
        self.dir = Path(data_dir)
        # File names are joined to this as plain strings: a ``Path`` join and its ``fspath``
        # per file cost more CPU than the sink's own encoding of the occurrence.
        self._prefix = os.path.join(os.fspath(self.dir), "")
        self.settings = settings
        self._index: dict[str, int] = {}  # file name -> size, in insertion (time) order
        self._bytes = 0
        self._loaded = False

    def _load_index(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        entries = []
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith(".tmp") and entry.name.startswith("."):
                    # A crash mid-write leaves a temp file; it was never visible, remove it.
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                    entries.append((entry.name, entry.stat(follow_symlinks=False).st_size))
        entries.sort()
        self._index = dict(entries)
        self._bytes = sum(self._index.values())
        self._loaded = True

    def _write_one(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` atomically; on failure no temporary file is left."""
        tmp = f"{self._prefix}.{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, self._prefix + name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write_batch(self, batch: Batch) -> None:
        if not self._loaded:
            self._load_index()
        written = 0
        first_error: OSError | None = None
        for occ in batch:
            name = f"{occ.id}.json"
            data = encode_pretty(occ)
            try:
                self._write_one(name, data)
            except OSError as exc:  # each occurrence is tried: a smaller one may still fit
                first_error = first_error or exc
                continue
            written += 1
            old = self._index.pop(name, 0)
            self._index[name] = len(data)
            self._bytes += len(data) - old
        self._enforce_retention()
        if first_error is not None:
            raise SinkError(
                f"{len(batch) - written} of {len(batch)} not written: {first_error}",
                written=written,
            ) from first_error

    def _enforce_retention(self) -> None:
        removed = 0
        while self._index and (
            len(self._index) > self.settings.max_files or self._bytes > self.settings.max_bytes
        ):
            name = next(iter(self._index))  # insertion order is time order
            size = self._index.pop(name)
            self._bytes -= size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._prefix + name)
            removed += 1
        if removed:
            log.debug("file sink retention", removed=removed, files=len(self._index))

    async def write(self, batch: Batch) -> None:
        await anyio.to_thread.run_sync(self._write_batch, batch)
