"""The floor: the irreducible Python work for the records the agent turns into occurrences.

For N connection-refused ring frames of the network observer's real layout the floor is
``struct.iter_unpack`` of the N frames, one dict per occurrence shaped like the agent's real
output line (the same keys, nesting and value types: a sample line the agent wrote in the same
run is the template), one ``msgspec`` ``encode_lines`` call and one ``write`` to a file. The file
sink's floor is the same up to the dicts, then per occurrence one pretty encoding and one
atomically renamed file, the sink's contract.

The agent cannot do less than this per occurrence in Python, so "agent CPU per occurrence /
floor" is a ratio that carries from one machine to the next, unlike absolute microseconds.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import time
from pathlib import Path
from typing import Any

import msgspec

from tapio.observers.network import NETWORK_EVENT

EV_CONN_REFUSED = 1


def refused_frames(n: int) -> bytes:
    """``n`` ring frames of refused connects (distinct ports and pids) in the real layout."""
    frame = NETWORK_EVENT.frame
    saddr = socket.inet_aton("127.0.0.1") + bytes(12)
    comm = b"connect_loop".ljust(16, b"\0")
    out = bytearray()
    for i in range(n):
        out += frame.pack(
            NETWORK_EVENT.size, 10**12 + i, 1, 4000 + i % 1000, 4000 + i % 1000,
            EV_CONN_REFUSED, socket.AF_INET, 1, 2, 7, 1, 40000 + i % 20000, 9,
            saddr, saddr, 111, 0, 0, 10, 0, 0, 0, 12_345, comm, 0, 0, 0,
        )  # fmt: skip
    return bytes(out)


def build_dicts(frames: bytes, sample: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per record, shaped like ``sample``; every value of ``data`` comes from the
    record (ints) or is a string made per record, as the agent does."""
    top = {k: v for k, v in sample.items() if k != "data"}
    code = sample.get("error", {}).get("code", "RST_RECEIVED")
    sample_data = sample.get("data", {})
    pid_source = sample_data.get("pid_source", "connect")
    # A line that names the connecting task's cgroups carries five keys more: the ids come
    # from the record, the path from a lookup (a constant here: the cheapest lookup there is).
    cgroup_path = sample_data.get("cgroup_path")
    # A line without some of them (a task whose cgroups were not named) keeps only its own keys.
    keys = None if "cgroup_path" in sample_data else list(sample_data)
    out: list[dict[str, Any]] = []
    append = out.append
    for (
        _h, ts, gen, pid, tid, _ev, _fam, _ps, _os, _ns, _fl, sport, dport,
        _sa, _da, _err, _rc, _tr, _cw, _rb, _rcur, _rs, dur, _comm, cg2, mcg, ccg,
    ) in struct.iter_unpack(NETWORK_EVENT.frame.format, frames):  # fmt: skip
        d = dict(top)
        d["id"] = f"{ts:026d}"
        d["timestamp"] = f"{ts}"
        d["error"] = {"code": code, "message": f"TCP RST 127.0.0.1:{sport} → 127.0.0.1:{dport}"}
        data = {
            "cgroup2_id": cg2,
            "cgroup_id": mcg,
            "cgroup_path": cgroup_path,
            "comm": "connect_loop",
            "config_generation": gen,
            "connect_duration_ms": dur // 1000 / 1000,
            "cpu_cgroup_id": ccg,
            "dst_ip": "127.0.0.1",
            "dst_port": dport,
            "family": "ipv4",
            "memory_cgroup_id": mcg,
            "pid": pid,
            "pid_source": pid_source,
            "protocol": "tcp",
            "reason": "rst",
            "src_ip": "127.0.0.1",
            "src_port": sport,
            "tid": tid,
            "timestamp_ns": ts,
        }
        d["data"] = data if keys is None else {k: data[k] for k in keys if k in data}
        append(d)
    return out


def floor_stdout(frames: bytes, sample: dict[str, Any], out_path: Path) -> float:
    """CPU seconds of the stdout floor for every record of ``frames``."""
    enc = msgspec.json.Encoder()
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        c0 = time.process_time()
        data = enc.encode_lines(build_dicts(frames, sample))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return time.process_time() - c0
    finally:
        os.close(fd)


def floor_file(frames: bytes, sample: dict[str, Any], out_dir: Path) -> float:
    """CPU seconds of the file sink's floor: one atomically renamed pretty file each."""
    enc = msgspec.json.Encoder()
    fmt = msgspec.json.format
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    c0 = time.process_time()
    for d in build_dicts(frames, sample):
        name = f"{d['id']}.json"
        tmp = f"{out_dir}/.{name}.tmp"
        fd = os.open(tmp, flags, 0o644)
        try:
            os.write(fd, fmt(enc.encode(d), indent=2))
        finally:
            os.close(fd)
        os.replace(tmp, f"{out_dir}/{name}")
    used = time.process_time() - c0
    for entry in os.scandir(out_dir):
        os.unlink(entry.path)
    return used


def floor_us(kind: str, n: int, sample: dict[str, Any], tmp: Path, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the floor's CPU per record, in microseconds."""
    frames = refused_frames(n)
    runs = []
    for _ in range(repeat):
        if kind == "stdout":
            runs.append(floor_stdout(frames, sample, tmp / "floor.jsonl"))
        else:
            runs.append(floor_file(frames, sample, tmp / "floor-files"))
    (tmp / "floor.jsonl").unlink(missing_ok=True)
    return statistics.median(runs) / n * 1e6


def sample_line(path: Path) -> dict[str, Any]:
    """The first connection-refused line (or file) the agent wrote in this run."""
    if path.is_dir():
        for entry in sorted(path.glob("*.json")):
            doc = msgspec.json.decode(entry.read_bytes())
            if doc.get("type") == "kernel.network.connection_refused":
                return dict(doc)
        raise SystemExit(f"floor: no connection_refused file in {path}")
    with path.open("rb") as f:
        for line in f:
            if b"connection_refused" in line:
                return dict(msgspec.json.decode(line))
    raise SystemExit(f"floor: no connection_refused line in {path}")
