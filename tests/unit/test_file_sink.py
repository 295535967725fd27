"""File sink: atomic one-file-per-occurrence writes and oldest-first bounded retention."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from tapio.occurrence import new_occurrence
from tapio.sinks.file import FileSink, FileSinkSettings


def occs(n: int, start_ms: int = 1_700_000_000_000) -> list:
    return [
        new_occurrence(
            "kernel.network.connection_refused",
            "warning",
            "failure",
            timestamp_ns=(start_ms + i) * 1_000_000,
            code="RST_RECEIVED",
            message=f"m{i:03d}",
            data={"i": f"{i:03d}"},
        )
        for i in range(n)
    ]


async def run_sink(sink: FileSink, batches: list[list]) -> None:
    send, recv = anyio.create_memory_object_stream[list](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.run, recv)
        async with send:
            for b in batches:
                await send.send(b)


async def test_one_pretty_file_per_occurrence(tmp_path: Path) -> None:
    batch = occs(3)
    await run_sink(FileSink(tmp_path / "d", FileSinkSettings()), [batch])
    files = sorted((tmp_path / "d").iterdir())
    assert [f.name for f in files] == sorted(f"{o.id}.json" for o in batch)
    text = files[0].read_text()
    assert text.startswith('{\n  "id"') and not text.endswith("\n")
    assert json.loads(text)["type"] == "kernel.network.connection_refused"
    assert not list((tmp_path / "d").glob(".*.tmp"))


async def test_retention_by_count_deletes_oldest(tmp_path: Path) -> None:
    batch = occs(25)
    sink = FileSink(tmp_path, FileSinkSettings(max_files=10))
    await run_sink(sink, [batch[:15], batch[15:]])
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == sorted(f"{o.id}.json" for o in batch[-10:])


async def test_retention_by_bytes(tmp_path: Path) -> None:
    batch = occs(20)
    size = len(await _one_size(tmp_path / "probe", batch[-1]))
    sink = FileSink(tmp_path / "d", FileSinkSettings(max_bytes=size * 5 + 10))
    await run_sink(sink, [batch])
    assert len(list((tmp_path / "d").glob("*.json"))) == 5


async def _one_size(d: Path, occ: object) -> bytes:
    await run_sink(FileSink(d, FileSinkSettings()), [[occ]])
    return next(d.glob("*.json")).read_bytes()


async def test_existing_files_count_toward_retention_and_stale_temps_are_removed(
    tmp_path: Path,
) -> None:
    first = occs(6)
    await run_sink(FileSink(tmp_path, FileSinkSettings()), [first])
    (tmp_path / ".junk.json.tmp").write_text("partial")
    second = occs(2, start_ms=1_800_000_000_000)
    await run_sink(FileSink(tmp_path, FileSinkSettings(max_files=4)), [second])
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == sorted(f"{o.id}.json" for o in [*first[-2:], *second])
    assert not (tmp_path / ".junk.json.tmp").exists()


async def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    sink = FileSink(target, FileSinkSettings())
    await run_sink(sink, [occs(2)])
    assert sink.stats.err_total == 2 and sink.stats.ok_total == 0
    assert sink.stats.dropped_total == 2  # counted as write_error drops (tests/unit/sinks)


def test_bounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileSink(tmp_path, FileSinkSettings(max_files=0))
