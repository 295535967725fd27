"""The network object's connect records on 5.12+: the slot table, seen from outside.

The table (``conn_slots``) is an array of sets of four slots; a socket's set is a hash of its
address, which userspace cannot know. So these tests either fill every set (then any connect's
set is full, wherever it lands) or look at the table as a whole: a record is handed back at
close, a full set gives its oldest record to a new connect, and a connect that finds no slot
it may take is counted and reported without an owner, never with someone else's.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..ports import closed_port
from .harness import (
    OBJECTS,
    AgentProcess,
    agent,
    kernel_release,
    net_client,
    network_map_id,
    require_kernel,
    wait_until,
)

pytestmark = pytest.mark.kernel

WAYS = 4
SETS = 1 << 13
INFO = struct.Struct("<Q3QII8x16s")  # start_ns, cgroup ids, pid, tid, (rst_seen, pad), comm
SET_BYTES = 8 * WAYS + INFO.size * WAYS
FREE, BUSY = 0, 1
# Started-at times of the four ways of every filled set: way 2 is the oldest, so "oldest" is
# not "first".
STARTS = (3, 4, 1, 2)
METRICS = "[metrics]\nenabled = true\nport = 0\n[agent]\nkernel_metrics_interval_secs = 0.2\n"


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel(("network",))


@pytest.fixture
def slots() -> None:
    if kernel_release() < (5, 12):
        pytest.skip("the slot table needs BPF atomics (5.12+); older kernels use the LRU hash")


def _fake(set_index: int, way: int) -> int:
    """An owner word no socket can have: a socket's is a multiple of 8, this one is not."""
    return (set_index << 16) | (way << 8) | 4


def _fill(tmp: Path, map_id: int, owner: Any) -> None:
    """Every way of every set owned by ``owner(set, way)``, started at STARTS[way]."""
    lines = []
    for s in range(SETS):
        owners = b"".join(struct.pack("<Q", owner(s, w)) for w in range(WAYS))
        infos = b"".join(INFO.pack(STARTS[w], 0, 0, 0, 0, 0, b"fake") for w in range(WAYS))
        value = " ".join(f"{b:02x}" for b in owners + infos)
        key = " ".join(f"{b:02x}" for b in struct.pack("<I", s))
        lines.append(f"map update id {map_id} key hex {key} value hex {value}")
    batch = tmp / "fill.bpftool"
    batch.write_text("\n".join(lines) + "\n")
    subprocess.run(["bpftool", "batch", "file", str(batch)], check=True, capture_output=True)


def _owners(map_id: int) -> dict[tuple[int, int], tuple[int, tuple[Any, ...]]]:
    """(set, way) -> (owner word, record) of the whole table."""
    out = subprocess.run(
        ["bpftool", "map", "dump", "id", str(map_id), "-j"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    table = {}
    for entry in json.loads(out):
        s = struct.unpack("<I", bytes(int(b, 16) for b in entry["key"]))[0]
        raw = bytes(int(b, 16) for b in entry["value"])
        assert len(raw) == SET_BYTES
        for w in range(WAYS):
            (owner,) = struct.unpack_from("<Q", raw, 8 * w)
            table[(s, w)] = (owner, INFO.unpack_from(raw, 8 * WAYS + INFO.size * w))
    return table


def _refuse(comm: str, port: int, count: int = 1) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        net_client("refuse", comm, "127.0.0.1", port, count),
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == [str(count)]
    return proc


def _refusals(a: AgentProcess, port: int, n: int) -> list[dict[str, Any]]:
    def mine() -> list[dict[str, Any]]:
        return [
            o
            for o in a.occurrences("kernel.network.connection_refused")
            if o["data"]["dst_port"] == port
        ]

    wait_until(lambda: len(mine()) >= n, 20)
    time.sleep(0.5)  # anything extra would arrive within a drain interval
    return mine()


def _untracked(a: AgentProcess) -> float:
    for fam in text_string_to_metric_families(a.metrics_text()):
        for s in fam.samples:
            if (
                s.name == "tapio_kernel_drops_total"
                and s.labels.get("observer") == "network"
                and s.labels.get("reason") == "untracked_close"
            ):
                return s.value
    return 0.0


def test_the_slot_programs_are_the_ones_loaded() -> None:
    """The cheap builds must not fall back silently: the slot table wherever BPF atomics exist
    (5.12+), else the LRU hash, all four programs of one kind."""
    from tapio.bpf.loader import BpfObject
    from tapio.observers import observer_class

    specs = observer_class("network").programs
    with BpfObject(OBJECTS / "network.bpf.o", programs=specs) as obj:
        obj.attach_all()
        tcp = {n for n in obj.attached if not n.startswith("dns_")}
        lru = {"handle_set_state", "handle_receive_reset", "handle_retransmit", "handle_tcp_probe"}
        if kernel_release() >= (5, 12):
            assert tcp == {f"{n}_slot" for n in lru}, obj.skipped
            assert "conns" not in obj.maps and "conn_slots" in obj.maps
        else:
            assert tcp == lru, obj.skipped
            assert "conn_slots" not in obj.maps and "conns" in obj.maps


@pytest.mark.usefixtures("slots")
def test_records_are_handed_back_and_an_open_connection_keeps_its_own(tmp_path: Path) -> None:
    """Refused connects leave no record behind; an established connection keeps one naming its
    connector until it closes, and then that one is handed back too."""
    port = closed_port(socket.AF_INET, "127.0.0.1")
    with agent(tmp_path) as a:
        map_id = network_map_id(a.logs(), "conn_slots")
        _refuse("tapio-slots", port, 200)
        assert len(_refusals(a, port, 200)) == 200
        with socket.create_server(("127.0.0.1", 0)) as srv:
            cli = socket.create_connection(srv.getsockname(), timeout=10)
            conn, _ = srv.accept()
            held = {k: v for k, v in _owners(map_id).items() if v[0] != FREE}
            cli.close()
            conn.close()
        gone = wait_until(
            lambda: not any(owner != FREE for owner, _ in _owners(map_id).values()), 10
        )
    assert len(held) == 1, held  # the test's own connection; none of the 200 refusals
    ((owner, (_start, _cg2, _memcg, _cpu, pid, tid, comm)),) = held.values()
    assert owner % 8 == 0 and (pid, tid) == (os.getpid(), os.getpid())
    assert comm.rstrip(b"\0") == Path("/proc/self/comm").read_bytes().strip()
    assert gone, "a closed connection's record was not handed back"


@pytest.mark.usefixtures("slots")
def test_a_full_set_gives_its_oldest_record_to_a_new_connect(tmp_path: Path) -> None:
    """Every set full of records nobody will close: the refused connect takes its set's oldest
    way (not its first), is reported with its own connector, and hands the way back."""
    port = closed_port(socket.AF_INET, "127.0.0.1")
    with agent(tmp_path) as a:
        map_id = network_map_id(a.logs(), "conn_slots")
        _fill(tmp_path, map_id, _fake)
        before = _owners(map_id)
        proc = _refuse("tapio-evict", port)
        occs = _refusals(a, port, 1)
        after = _owners(map_id)
    assert len(occs) == 1, occs
    d = occs[0]["data"]
    assert (d["pid"], d["comm"], d["pid_source"], d["reason"]) == (
        proc.pid,
        "tapio-evict",
        "connect",
        "rst",
    )
    changed = [k for k in before if before[k] != after[k]]
    assert len(changed) == 1 and changed[0][1] == STARTS.index(min(STARTS)), changed
    assert after[changed[0]][0] == FREE


@pytest.mark.usefixtures("slots")
def test_a_connect_that_finds_no_slot_is_reported_without_an_owner_and_counted(
    tmp_path: Path,
) -> None:
    """Every slot busy (being written by another CPU, as far as the programs can tell): the
    connect is not recorded, so its refusal names no process, and the close is counted as
    untracked; the busy slots are left alone."""
    port = closed_port(socket.AF_INET, "127.0.0.1")
    with agent(tmp_path, config=METRICS) as a:
        map_id = network_map_id(a.logs(), "conn_slots")
        _fill(tmp_path, map_id, lambda s, w: BUSY)
        untracked = _untracked(a)
        proc = _refuse("tapio-busy", port, 3)
        occs = _refusals(a, port, 3)
        counted = wait_until(lambda: _untracked(a) - untracked >= 3 or None, 5)
        delta = _untracked(a) - untracked
        after = _owners(map_id)
    assert len(occs) == 3, occs
    for o in occs:
        d = o["data"]
        assert d["pid_source"] == "none" and d["pid"] != proc.pid and d["comm"] != "tapio-busy"
    assert counted and delta == 3, delta
    assert all(owner == BUSY for owner, _ in after.values())
