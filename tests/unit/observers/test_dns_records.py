"""DNS records in userspace: question decoding, classification, flood control, the sweep.

Malformed input is a counted drop, never an exception; every fact of an occurrence is asserted.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter

import pytest

from tapio.bpf.abi import TapioConfig
from tapio.observers.dns.record import (
    DNS_EVENT,
    DNS_KEY,
    DNS_QUERY,
    EV_ERROR,
    EV_SLOW,
    MalformedQuestion,
    decode_question,
    timeout_record,
)
from tapio.observers.dns.tracker import METRIC_ANSWERED, METRIC_TRACKED, DnsTracker
from tapio.thresholds import Thresholds


def qname(name: str, qtype: int = 1) -> bytes:
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return wire + struct.pack("!HH", qtype, 1)


def event(
    *,
    ev: int = EV_ERROR,
    rcode: int = 2,
    raw: bytes | None = None,
    raw_len: int | None = None,
    family: int = 2,
    proto: int = 17,
    pid_source: int = 1,
    cgroup: int = 4242,
    server: str = "192.0.2.2",
    latency_ns: int = 1_500_000,
) -> tuple[object, ...]:
    raw = qname("Fail.Test") if raw is None else raw
    fam = socket.AF_INET6 if family == 10 else socket.AF_INET
    srv = socket.inet_pton(fam, server).ljust(16, b"\0")
    cli = socket.inet_pton(fam, "::1" if family == 10 else "192.0.2.1").ljust(16, b"\0")
    key = DNS_KEY.struct.pack(cli, srv, 40001, 53, 0xBEEF, family, proto)
    query = DNS_QUERY.struct.pack(
        10,
        cgroup,
        321,
        322,
        pid_source,
        len(raw) if raw_len is None else raw_len,
        0x0100,
        b"resolver",
        raw.ljust(128, b"\0")[:128],
    )
    rec = (
        (20).to_bytes(8, "little")
        + (7).to_bytes(4, "little")
        + bytes(4)
        + key
        + query
        + struct.pack("<QBBH4x", latency_ns, ev, rcode, 0x8180 | rcode)
    )
    return DNS_EVENT.struct.unpack(rec)


class Drops(Counter[str]):
    def __call__(self, reason: str, n: int = 1) -> None:
        self[reason] += n


def tracker(**user: object) -> tuple[DnsTracker, Drops]:
    drops = Drops()
    t = DnsTracker(1_000, lambda raw: raw.split(b"\0")[0].decode(), drops)
    t.configure(TapioConfig(generation=7, dns_flags=1), Thresholds(**user))  # type: ignore[arg-type]
    return t, drops


# ---- question decoding --------------------------------------------------------------------


def test_question_is_lower_cased_with_its_type() -> None:
    raw = qname("WWW.Example.COM", 28)
    assert decode_question(raw, len(raw)) == ("www.example.com", 28, False)


def test_root_and_non_printable_labels() -> None:
    assert decode_question(b"\0\0\x01\0\x01", 5) == (".", 1, False)
    q = decode_question(b"\x03a b\x01\x07\x00\x00\x01\x00\x01", 11)
    assert q.name == "a\\032b.\\007" and q.qtype == 1


def test_cut_short_names_are_flagged_truncated() -> None:
    raw = qname("a" * 60 + "." + "b" * 60 + "." + "c" * 60)
    q = decode_question(raw, 128)
    assert q.truncated and q.qtype == 0 and q.name.startswith("a" * 60 + "." + "b" * 60 + ".")
    assert decode_question(b"\x05ab", 3) == ("ab", 0, True)
    # name complete, type cut off
    assert decode_question(b"\x02ab\x00\x00", 5) == ("ab", 0, False)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc0\x0c\x00\x01", b"\x40abc", b"\x80abc", (b"\x3f" + b"a" * 63) * 5 + b"\0"],
    ids=["empty", "pointer", "ext-label", "reserved", "too-long"],
)
def test_malformed_questions_raise_their_own_error(raw: bytes) -> None:
    with pytest.raises(MalformedQuestion):
        decode_question(raw, len(raw))


def test_random_question_bytes_never_escape_as_another_exception() -> None:
    rng = random.Random(14)
    for _ in range(5000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 129)))
        try:
            q = decode_question(raw.ljust(128, b"\0"), len(raw))
        except MalformedQuestion:
            continue
        assert q.name.isprintable() and len(q.name) <= 253


# ---- classification -----------------------------------------------------------------------


def test_servfail_occurrence_facts() -> None:
    t, drops = tracker(dns_window_ms=0)
    [occ] = t.classify([event()], 0)
    assert occ.type == "kernel.network.dns_error" and occ.severity == "warning"
    assert occ.outcome == "failure"
    assert occ.error is not None and occ.error.code == "SERVFAIL"
    assert occ.error.message == "DNS SERVFAIL for fail.test A from 192.0.2.2:53"
    assert occ.data == {
        "cgroup2_id": 4242,
        "client_ip": "192.0.2.1",
        "client_port": 40001,
        "comm": "resolver",
        "config_generation": 7,
        "count": 1,
        "dns_id": 0xBEEF,
        "family": "ipv4",
        "latency_ms": 1.5,
        "pid": 321,
        "pid_source": "sender",
        "query_name": "fail.test",
        "query_name_truncated": False,
        "query_type": "A",
        "query_type_code": 1,
        "rcode": "SERVFAIL",
        "rcode_code": 2,
        "server_ip": "192.0.2.2",
        "server_port": 53,
        "tid": 322,
        "timestamp_ns": 20,
        "transport": "udp",
    }
    assert list(occ.data) == sorted(occ.data)
    assert not drops


def test_slow_tcp_ipv6_and_a_task_that_is_not_the_owner() -> None:
    t, _ = tracker(dns_window_ms=0)
    [occ] = t.classify(
        [
            event(
                ev=EV_SLOW,
                rcode=0,
                family=10,
                proto=6,
                server="fd00::2",
                pid_source=3,
                latency_ns=301_250_000,
            )
        ],
        0,
    )
    d = occ.data
    assert d is not None and occ.type == "kernel.network.dns_slow"
    assert (d["transport"], d["family"], d["server_ip"], d["latency_ms"]) == (
        "tcp",
        "ipv6",
        "fd00::2",
        301.25,
    )
    # the task on the CPU was not the socket's owner: no pid/comm is claimed
    assert (d["pid"], d["tid"], d["comm"], d["pid_source"]) == (0, 0, "", "not_owner")


def test_timeout_record_classified_without_rcode() -> None:
    t, _ = tracker(dns_window_ms=0)
    key = DNS_KEY.struct.pack(
        b"\x7f\0\0\x01".ljust(16, b"\0"), b"\x7f\0\0\x35".ljust(16, b"\0"), 5000, 53, 1, 2, 17
    )
    query = DNS_QUERY.struct.pack(1_000_000, 1, 5, 5, 1, 13, 0x100, b"dig", qname("drop.test"))
    rec = DNS_EVENT.struct.unpack(timeout_record(key, query, 5_001_000_000, 7))
    [occ] = t.classify([rec], 0)
    assert occ.type == "kernel.network.dns_timeout" and occ.outcome == "timeout"
    assert occ.data is not None and "rcode" not in occ.data
    assert occ.data["latency_ms"] == 5000.0 and occ.data["server_ip"] == "127.0.0.53"


@pytest.mark.parametrize(
    ("rec", "reason"),
    [
        (event(ev=9), "unknown_record_type"),
        (event(family=7), "dns_malformed_record"),
        (event(raw=b"\xc0\x0c\0\x01\0\x01"), "dns_malformed_question"),
        (event(raw_len=0), "dns_malformed_question"),
        (event(raw_len=200), "dns_malformed_question"),
    ],
)
def test_malformed_records_are_counted_drops(rec: tuple[object, ...], reason: str) -> None:
    t, drops = tracker(dns_window_ms=0)
    assert t.classify([rec], 0) == []
    assert drops == {reason: 1}


# ---- flood control ------------------------------------------------------------------------


def test_identical_failures_in_a_window_are_one_occurrence_with_count() -> None:
    t, drops = tracker(dns_window_ms=5000)
    now = 10**12
    for i in range(1000):
        assert t.classify([event()], now + i * 2_000_000) == []
    assert t.flood.due(now + 4_999_000_000) == []
    [occ] = t.flood.due(now + 5_000_000_000)
    assert occ.data is not None and (occ.data["count"], occ.data["window_ms"]) == (1000, 5000)
    assert occ.error is not None and occ.error.message.endswith("(1000 times within 5000 ms)")
    assert list(occ.data) == sorted(occ.data)
    assert not drops and len(t.flood) == 0


def test_different_name_server_rcode_cgroup_or_transport_are_separate() -> None:
    t, _ = tracker(dns_window_ms=5000)
    recs = [
        event(),
        event(raw=qname("other.test")),
        event(server="192.0.2.3"),
        event(rcode=5),
        event(cgroup=1),
        event(proto=6),
        event(),
    ]
    t.classify(recs, 0)
    out = t.flood.due(0, everything=True)
    assert sorted(o.data["count"] for o in out if o.data) == [1, 1, 1, 1, 1, 2]


def test_per_second_cap_counts_what_it_refuses() -> None:
    t, drops = tracker(dns_window_ms=0, dns_cap=100)
    recs = [event(raw=qname(f"n{i}.test")) for i in range(150)]
    assert len(t.classify(recs, 3 * 10**9)) == 100
    assert drops == {"dns_rate_capped": 50}
    assert len(t.classify(recs[:10], 4 * 10**9)) == 10  # a new second


# ---- the sweep ----------------------------------------------------------------------------


class FakeMap:
    def __init__(self, entries: dict[bytes, bytes], max_entries: int = 64) -> None:
        self.entries = dict(entries)
        self.max_entries = max_entries
        self.stolen: set[bytes] = set()  # deleted by "the kernel" between walk and claim

    def next_key(self, key: bytes | None) -> bytes | None:
        keys = sorted(self.entries)
        if key is None:
            return keys[0] if keys else None
        later = [k for k in keys if k > key]
        return later[0] if later else None

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def delete(self, key: bytes) -> bool:
        if key in self.stolen:
            del self.entries[key]
            return False
        return self.entries.pop(key, None) is not None


class FakeMetrics:
    def __init__(self, values: dict[int, int]) -> None:
        self.values = values

    def percpu_u64_sum(self, index: int) -> int:
        return self.values.get(index, 0)


def _pending(n: int, sent_ns: int, port: int = 1000) -> dict[bytes, bytes]:
    out = {}
    for i in range(n):
        key = DNS_KEY.struct.pack(bytes(16), bytes(16), port + i, 53, i, 2, 17)
        out[key] = DNS_QUERY.struct.pack(sent_ns, 1, 2, 2, 1, 13, 0x100, b"c", qname("drop.test"))
    return out


def test_sweep_expires_only_old_queries_and_claims_each_once() -> None:
    t, drops = tracker(dns_timeout_ms=1000)
    old, young = _pending(3, 1_000), _pending(2, 9_500_000_000, port=2000)
    fake = FakeMap({**old, **young})
    fake.stolen.add(sorted(old)[0])  # its answer arrived meanwhile: not a timeout
    t._pending = fake  # type: ignore[assignment]
    t._metrics = FakeMetrics({METRIC_TRACKED: 5, METRIC_ANSWERED: 1})  # type: ignore[assignment]
    out = t.sweep(10**10)
    assert len(out) == 2 and len(fake.entries) == 2
    assert all(r[DNS_EVENT.index["event_type"]] == 3 for r in out)
    assert not drops  # 5 tracked - 1 answered - 2 expired - 2 pending = 0 evicted


def test_sweep_counts_lru_evictions_once() -> None:
    t, drops = tracker()
    t._pending = FakeMap(_pending(1, 10**10))  # type: ignore[assignment]
    t._metrics = FakeMetrics({METRIC_TRACKED: 10, METRIC_ANSWERED: 4})  # type: ignore[assignment]
    t.sweep(10**10)
    t.sweep(10**10)
    assert drops == {"dns_query_evicted": 5}
