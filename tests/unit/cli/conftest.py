"""Fixtures for the CLI/MCP tests: occurrence directories built from real ``Occurrence`` objects."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tapio.cli.main import main
from tapio.occurrence import (
    ANOMALY_TYPES,
    Occurrence,
    OccurrenceError,
    encode_pretty,
    format_timestamp,
    new_occurrence,
    parse_timestamp,
)

NS = 1_000_000_000
MIN = 60 * NS
HOUR = 60 * MIN

#: Frozen "now" for exact-output tests: 20 minutes after midnight UTC.
NOW = parse_timestamp("2024-01-15T00:20:00+00:00")

SEVERITY_OF = {
    "kernel.network.connection_refused": "warning",
    "kernel.network.connection_timeout": "error",
    "kernel.network.retransmit_spike": "warning",
    "kernel.network.rtt_degradation": "warning",
    "kernel.network.dns_timeout": "error",
    "kernel.network.dns_error": "warning",
    "kernel.network.dns_slow": "warning",
    "kernel.container.oom_kill": "critical",
    "kernel.container.abnormal_exit": "error",
    "kernel.storage.io_error": "critical",
    "kernel.storage.latency_spike": "warning",
    "kernel.node.cpu_stall": "critical",
    "kernel.node.memory_pressure": "warning",
    "kernel.node.ipc_degradation": "warning",
}


def write_occ(directory: Path, occ: Occurrence, *, atomic: bool = True) -> Path:
    """Write like the file sink: pretty JSON to ``.<id>.json.tmp`` then rename."""
    target = directory / f"{occ.id}.json"
    if atomic:
        tmp = directory / f".{occ.id}.json.tmp"
        tmp.write_bytes(encode_pretty(occ))
        os.replace(tmp, target)
    else:
        target.write_bytes(encode_pretty(occ))
    return target


def occ(
    id_: str,
    timestamp: str,
    type_: str,
    severity: str,
    message: str | None = None,
    data: dict[str, object] | None = None,
) -> Occurrence:
    return Occurrence(
        id=id_,
        timestamp=timestamp,
        source="tapio",
        type=type_,
        severity=severity,  # type: ignore[arg-type]
        outcome="failure",
        protocol_version="1.0",
        error=OccurrenceError("CODE", message) if message is not None else None,
        data=data,
    )


#: A small fixed data set for exact-output tests (offsets other than +00:00 on purpose).
FIXED = [
    occ(
        "01HM0000000000000000000001",
        "2024-01-15T00:19:30.123456789+00:00",
        "kernel.network.connection_refused",
        "warning",
        "TCP RST 127.0.0.1:40000 → 127.0.0.1:5555",
    ),
    # 01:10+01:00 == 00:10Z: lexically "later" than now, really 10 minutes ago.
    occ(
        "01HM0000000000000000000002",
        "2024-01-15T01:10:00+01:00",
        "kernel.storage.io_error",
        "critical",
        "I/O error on 8:0 (error=-5, read)",
    ),
    # Before midnight, 30 minutes ago: inside the last hour.
    occ(
        "01HM0000000000000000000003",
        "2024-01-14T23:50:00.000000001+00:00",
        "kernel.node.cpu_stall",
        "critical",
        "CPU 0 stall 55.0% (ipc=0.40)",
    ),
    # 18:00-05:00 == 23:00Z: 80 minutes ago, outside the last hour.
    occ(
        "01HM0000000000000000000004",
        "2024-01-14T18:00:00-05:00",
        "kernel.container.oom_kill",
        "critical",
        "OOM kill pid=42 (usage=512MB, limit=0MB)",
        {"container_id": "abcdef0123456789" * 4, "pod_uid": "1234-abcd"},
    ),
    # 05:49+05:30 == 00:19Z.
    occ(
        "01HM0000000000000000000005",
        "2024-01-15T05:49:00+05:30",
        "kernel.network.retransmit_spike",
        "warning",
        "TCP retransmit 10.0.0.1:1 → 10.0.0.2:2 (total=5, cwnd=10)",
    ),
    occ(
        "01HM0000000000000000000006",
        "2024-01-13T12:00:00+00:00",
        "kernel.container.abnormal_exit",
        "error",
        "Abnormal exit pid=7 (code=1, signal=0)",
        {"container_id": "ffff" * 16, "pod_uid": "1234_abcd"},
    ),
    occ(
        "01HM0000000000000000000007",
        "2024-01-15T00:00:00Z",
        "kernel.node.memory_pressure",
        "warning",
    ),
]


@dataclass
class Run:
    code: int
    out: str
    err: str


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(
    argv: Sequence[str],
    *,
    now: int = NOW,
    env: dict[str, str] | None = None,
    tty: bool = False,
    clock: Callable[[], int] | None = None,
) -> Run:
    out: io.StringIO = FakeTTY() if tty else io.StringIO()
    err = io.StringIO()
    code = main(
        list(argv),
        stdout=out,
        stderr=err,
        environ=env if env is not None else {},
        clock=clock or (lambda: now),
    )
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture
def fixed_dir(tmp_path: Path) -> Path:
    d = tmp_path / "occ"
    d.mkdir()
    for o in FIXED:
        write_occ(d, o)
    return d


def write_junk(d: Path) -> dict[str, str]:
    """Corrupt, partial and invalid files; returns name -> expected reason prefix."""
    good = encode_pretty(new_occurrence("kernel.node.cpu_stall", "critical", "in_progress"))
    (d / "corrupt.json").write_bytes(b"\x00\xffnot json at all")
    (d / "partial.json").write_bytes(good[: len(good) // 2])
    (d / "empty.json").write_bytes(b"")
    (d / "badtype.json").write_bytes(good.replace(b"kernel.node.cpu_stall", b"kernel.node"))
    (d / "badsev.json").write_bytes(good.replace(b'"critical"', b'"fatal"'))
    (d / "badts.json").write_bytes(
        good.replace(good.split(b'"timestamp": "')[1].split(b'"')[0], b"yesterday")
    )
    (d / "array.json").write_bytes(b"[1, 2, 3]")
    (d / "dir.json").mkdir()
    # Never candidates: temp files of the sink and other names.
    (d / ".01HM0000000000000000000099.json.tmp").write_bytes(good[:10])
    (d / ".hidden.json").write_bytes(b"{")
    (d / "notes.txt").write_bytes(b"hello")
    return {
        "corrupt.json": "JSON is malformed",
        "partial.json": "Input data was truncated",
        "empty.json": "empty file",
        "badtype.json": "type must be three non-empty dot-separated segments",
        "badsev.json": "Invalid enum value 'fatal'",
        "badts.json": "invalid timestamp 'yesterday'",
        "array.json": "Expected `object`, got `array`",
        "dir.json": "not a regular file",
    }


@dataclass
class Generated:
    directory: Path
    occurrences: list[Occurrence]
    junk: dict[str, str]


def generate(directory: Path, *, per_type: int, now: int = NOW, seed: int = 7) -> list[Occurrence]:
    """``per_type`` occurrences of each of the 11 types spread over the last three days, some
    with non-UTC offsets, all written atomically."""
    rng = random.Random(seed)
    offsets = ["+00:00", "+05:30", "-08:00", "+01:00", "Z"]
    out = []
    for type_ in ANOMALY_TYPES:
        for _ in range(per_type):
            ts_ns = now - rng.randrange(0, 72 * HOUR)
            o = new_occurrence(
                type_,
                SEVERITY_OF[type_],  # type: ignore[arg-type]
                "failure",
                timestamp_ns=ts_ns,
                code="X",
                message=f"{type_} at {ts_ns}",
                data={"pid": rng.randrange(1, 10**6)},
            )
            offset = rng.choice(offsets)
            if offset != "+00:00":
                o.timestamp = render_offset(ts_ns, offset)
            write_occ(directory, o)
            out.append(o)
    return out


def render_offset(ts_ns: int, offset: str) -> str:
    """The same instant rendered with another UTC offset."""
    if offset == "Z":
        return format_timestamp(ts_ns).replace("+00:00", "Z")
    sign = 1 if offset[0] == "+" else -1
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    shift = sign * (hours * HOUR + minutes * MIN)
    return format_timestamp(ts_ns + shift).replace("+00:00", offset)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    d = tmp_path_factory.mktemp("big")
    occs = generate(d, per_type=60)
    junk = write_junk(d)
    return Generated(d, occs, junk)
