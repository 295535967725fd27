"""DNS evidence end to end: the real agent, the real cgroup_skb programs, a resolver of our own.

A DNS server (tests/kernel/dns_peers.py) runs inside a private network namespace. Stub-resolver
processes with their own comm query it from a second namespace (over the NsPair veth) and from
the root namespace (over a veth of the test's own); every occurrence is asserted exactly: type,
count, the client's pid and comm, the query name, the server address, the transport.

Who sent a query is only knowable where the kernel gives ``cgroup_skb`` programs the task
helpers (Debian's 5.10, 6.1 and 6.12 kernels do not): there the occurrence must name the stub's pid
and comm; elsewhere it must say ``pid_source: "unavailable"`` with pid 0 and no comm, never a
guess. The cgroup id attributes the query on every kernel.
"""

from __future__ import annotations

import functools
import os
import secrets
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tapio.bpf import features

from .harness import TIME_SCALE, agent, require_kernel, wait_until
from .netns import NsPair, ns_pair, sh

pytestmark = pytest.mark.kernel
PEERS = str(Path(__file__).with_name("dns_peers.py"))
ROOT_IP, ROOT_PEER_IP = "198.51.100.1", "198.51.100.2"  # TEST-NET-2, on the test's own veth
DNS = "kernel.network.dns_"


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel(("network",))


BPF_PROG_TYPE_CGROUP_SKB = 8


@functools.cache
def names_sender() -> bool:
    """Whether this kernel lets the egress program see the sending task, asked the hard way:
    a valid ``cgroup_skb`` program calling the three task helpers either loads or it does not.
    (Not the agent's own probe, so a probe that guessed wrong cannot agree with itself here.)"""
    insns = b"".join(
        struct.pack("=BBhi", code, regs, 0, imm)
        for code, regs, imm in (
            (0x85, 0, 14),  # call bpf_get_current_pid_tgid
            (0x85, 0, 15),  # call bpf_get_current_uid_gid
            (0xBF, 0xA1, 0),  # r1 = r10
            (0x07, 0x01, -16),  # r1 += -16
            (0xB7, 0x02, 16),  # r2 = 16
            (0x85, 0, 16),  # call bpf_get_current_comm(r1, r2)
            (0xB7, 0x00, 1),  # r0 = 1
            (0x95, 0, 0),  # exit
        )
    )
    fd, _ = features.load_raw_program(BPF_PROG_TYPE_CGROUP_SKB, insns, log_size=0)
    if fd < 0:
        return False
    os.close(fd)
    return True


def sender(comm: str, pid: int) -> tuple[str, int]:
    """The (comm, pid) an occurrence must carry for a query sent by ``comm``/``pid``."""
    return (comm, pid) if names_sender() else ("", 0)


@dataclass
class World:
    pair: NsPair
    server_ns: str  # 192.0.2.2 / fd00:7a9::2 (from pair.a), 198.51.100.2 (from the root ns)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with ns_pair() as pair:
        tag = secrets.token_hex(3)
        veth_r, veth_s = f"tvr{tag}", f"tvs{tag}"
        server: subprocess.Popen[bytes] | None = None
        try:
            sh(f"ip link add {veth_r} type veth peer name {veth_s} netns {pair.b}")
            sh(f"ip addr add {ROOT_IP}/24 dev {veth_r} && ip link set {veth_r} up")
            sh(f"ip -n {pair.b} addr add {ROOT_PEER_IP}/24 dev {veth_s}")
            sh(f"ip -n {pair.b} link set {veth_s} up")
            ready = tmp_path / "dns-ready"
            server = subprocess.Popen(
                ["ip", "netns", "exec", pair.b, sys.executable, PEERS, "serve", str(ready)]
            )
            assert wait_until(ready.exists, 10), "DNS server did not start"
            yield World(pair, pair.b)
        finally:
            if server is not None:
                server.kill()
                server.wait(timeout=10)
            sh(f"ip link del {veth_r}", check=False)


def query(
    comm: str,
    server: str,
    name: str,
    transport: str = "udp",
    count: int = 1,
    ns: str | None = None,
    wait: float = 2.0,
) -> tuple[int, list[str]]:
    """Run the stub resolver; its pid and one RCODE (or "timeout") per query."""
    cmd = [sys.executable, PEERS, "query", comm, server, name, transport, str(count), str(wait)]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    lines = out.split()
    return int(lines[0]), lines[1:]


def own_cgroup2_id() -> int:
    """The cgroup v2 id of this process (its children, the clients, inherit it)."""
    rel = next(
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if Path(root, "cgroup.procs").exists():
            return os.stat(root + rel).st_ino
    raise AssertionError("no cgroup v2 hierarchy")


def dns_occurrences(a: Any) -> list[dict[str, Any]]:
    return [o for o in a.occurrences(DNS) if str(o["data"]["query_name"]).endswith(".test")]


CONFIG = """
[thresholds]
dns_timeout_ms = 1000
dns_window_ms = 1500
"""


def test_each_failure_exactly_once_with_its_sender(tmp_path: Path, world: World) -> None:
    ns = world.pair.a
    answers = (("ok", "0"), ("fail", "2"), ("refused", "5"), ("nx", "3"), ("slow", "0"))
    # (comm, client ns, server, name, transport, expected answer)
    plan = [
        (f"dq-{where}-{n[:4]}", cns, server, n, "udp", r)
        for where, cns, server in (("ns", ns, "192.0.2.2"), ("rt", None, ROOT_PEER_IP))
        for n, r in (*answers, ("drop", "timeout"))
    ]
    plan += [
        ("dq-ns-tcp-fail", ns, "192.0.2.2", "fail", "tcp", "2"),
        ("dq-ns6-fail", ns, world.pair.ip6_b, "fail", "udp", "2"),
    ]
    with agent(tmp_path, config=CONFIG) as a:
        pids: dict[str, int] = {}
        for comm, cns, server, name, transport, expect in plan:
            pid, answered = query(comm, server, f"{name}.test", transport, ns=cns)
            assert answered == [expect], (comm, answered)
            pids[comm] = pid
        expected = {
            "dq-ns-fail": "kernel.network.dns_error",
            "dq-ns-refu": "kernel.network.dns_error",
            "dq-ns-slow": "kernel.network.dns_slow",
            "dq-ns-drop": "kernel.network.dns_timeout",
            "dq-rt-fail": "kernel.network.dns_error",
            "dq-rt-refu": "kernel.network.dns_error",
            "dq-rt-slow": "kernel.network.dns_slow",
            "dq-rt-drop": "kernel.network.dns_timeout",
            "dq-ns-tcp-fail": "kernel.network.dns_error",
            "dq-ns6-fail": "kernel.network.dns_error",
        }
        wait_until(lambda: len(dns_occurrences(a)) >= len(expected), 15)
        time.sleep(2.5 * TIME_SCALE)  # a window and a sweep more: nothing else may follow
        got = dns_occurrences(a)
    # Each query is told apart by what the wire says (name, server, transport), so the check
    # holds where the kernel cannot name the sender as well as where it can.
    by_wire = {(f"{p[3]}.test", p[2], p[4]): p for p in plan}
    seen = Counter(
        by_wire[d["query_name"], d["server_ip"], d["transport"]][0]
        for d in (o["data"] for o in got)
    )
    assert seen == Counter(expected.keys()), (seen, got)
    cgroup = own_cgroup2_id()
    named = names_sender()
    for occ in got:
        d = occ["data"]
        comm, cns, server, name, transport, _ = by_wire[
            d["query_name"], d["server_ip"], d["transport"]
        ]
        assert occ["type"] == expected[comm], occ
        assert (d["comm"], d["pid"]) == sender(comm, pids[comm]) and d["tid"] == d["pid"], occ
        assert d["query_name"] == f"{name}.test" and d["query_type"] == "A", occ
        assert d["query_name_truncated"] is False
        assert d["server_ip"] == server and d["server_port"] == 53, occ
        assert d["transport"] == transport, occ
        assert d["family"] == ("ipv6" if ":" in server else "ipv4")
        source = ("tcp_transmit" if transport == "tcp" else "sender") if named else "unavailable"
        assert d["pid_source"] == source, occ
        assert d["count"] == 1, occ
        assert d["cgroup2_id"] == cgroup, occ
        assert d["config_generation"] == 1
        if occ["type"].endswith("dns_error"):
            rcode = {"fail": ("SERVFAIL", 2), "refused": ("REFUSED", 5)}[name]
            assert (d["rcode"], d["rcode_code"]) == rcode, occ
            assert occ["error"]["code"] == rcode[0]
        elif occ["type"].endswith("dns_slow"):
            assert 290 <= d["latency_ms"] <= 300 + 700 * TIME_SCALE, occ
            assert d["rcode"] == "NOERROR"
        else:
            assert "rcode" not in d and occ["outcome"] == "timeout"
            assert 1000 <= d["latency_ms"] <= 1000 + 1500 * TIME_SCALE, occ


def test_nxdomain_reported_only_when_the_profile_asks(tmp_path: Path, world: World) -> None:
    config = CONFIG + "dns_include_nxdomain = true\n"
    with agent(tmp_path, config=config) as a:
        pid, answers = query("dq-nx-on", "192.0.2.2", "nx.test", ns=world.pair.a)
        assert answers == ["3"]
        pid_ok, _ = query("dq-nx-ok", "192.0.2.2", "ok.test", ns=world.pair.a)
        wait_until(lambda: dns_occurrences(a), 10)
        time.sleep(2.5 * TIME_SCALE)
        got = dns_occurrences(a)
    assert len(got) == 1, got
    d = got[0]["data"]
    assert got[0]["type"] == "kernel.network.dns_error"
    assert (d["rcode"], d["rcode_code"]) == ("NXDOMAIN", 3)
    assert (d["comm"], d["pid"]) == sender("dq-nx-on", pid)
    assert (d["query_name"], d["server_ip"], d["count"]) == ("nx.test", "192.0.2.2", 1)
    assert pid_ok != pid


def test_a_thousand_identical_failures_are_one_occurrence(tmp_path: Path, world: World) -> None:
    """Default window (5 s): 1,000 SERVFAILs of one name in under 2 s → one occurrence."""
    with agent(tmp_path) as a:
        t0 = time.monotonic()
        pid, answers = query("dq-flood", "192.0.2.2", "fail.test", count=1000, ns=world.pair.a)
        elapsed = time.monotonic() - t0
        assert answers == ["2"] * 1000
        assert elapsed < 2.0 * TIME_SCALE, elapsed
        wait_until(lambda: dns_occurrences(a), 10)
        time.sleep(1.0 * TIME_SCALE)
        got = dns_occurrences(a)
    assert len(got) == 1, [o["data"] for o in got]
    d = got[0]["data"]
    assert got[0]["type"] == "kernel.network.dns_error"
    assert (d["count"], d["window_ms"]) == (1000, 5000)
    assert (d["comm"], d["pid"]) == sender("dq-flood", pid)
    assert (d["query_name"], d["server_ip"], d["rcode"]) == ("fail.test", "192.0.2.2", "SERVFAIL")
    assert "1000 times within 5000 ms" in got[0]["error"]["message"]
