"""The DNS mirrors (src/tapio/observers/dns/record.py) match bpf/network.h byte for byte, and the
carrier's DNS fields pack where tapio_config.h puts them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapio.bpf.abi import MAX_DNS_PORTS, TAPIO_CONFIG, CStruct, TapioConfig
from tapio.observers.dns.record import (
    DNS_EVENT,
    DNS_KEY,
    DNS_QUERY,
    EVENT_HEAD,
    EVENT_TAIL,
    KEY_OFFSET,
    QUERY_OFFSET,
    timeout_record,
)

from .layout_probe import assert_layout

OBJECT = Path(__file__).resolve().parents[2] / "src" / "tapio" / "bpf" / "objects" / "network.bpf.o"

#: dns_event as C declares it: the embedded key and query as one member each.
EVENT_TOP = CStruct(
    "dns_event",
    [*EVENT_HEAD, ("key", f"{DNS_KEY.size}s"), ("query", f"{DNS_QUERY.size}s"), *EVENT_TAIL],
    248,
)


@pytest.mark.parametrize("mirror", (DNS_KEY, DNS_QUERY, EVENT_TOP), ids=lambda m: m.name)
def test_dns_mirrors_match_the_header(mirror: CStruct) -> None:
    assert_layout("network.h", mirror)


def test_flattened_event_is_key_and_query_in_place() -> None:
    assert DNS_EVENT.size == EVENT_TOP.size == 248
    assert EVENT_TOP.offsets["key"] == KEY_OFFSET and EVENT_TOP.offsets["query"] == QUERY_OFFSET
    for inner, base in ((DNS_KEY, KEY_OFFSET), (DNS_QUERY, QUERY_OFFSET)):
        for name, off in inner.offsets.items():
            if not name.startswith("_"):
                assert DNS_EVENT.offsets[name] == base + off, name
    for name in ("timestamp_ns", "config_generation", "latency_ns", "event_type", "rcode"):
        assert DNS_EVENT.offsets[name] == EVENT_TOP.offsets[name]


def test_timeout_record_has_the_kernel_layout() -> None:
    key = DNS_KEY.struct.pack(b"\x0a" * 16, b"\x0b" * 16, 40000, 53, 0x1234, 2, 17)
    query = DNS_QUERY.struct.pack(1_000, 77, 10, 11, 1, 4, 0x0100, b"dig", b"\x02ab\x00")
    rec = timeout_record(key, query, 6_000, 9)
    f = DNS_EVENT.struct.unpack(rec)
    i = DNS_EVENT.index
    assert (f[i["timestamp_ns"]], f[i["config_generation"]], f[i["latency_ns"]]) == (6000, 9, 5000)
    assert (f[i["event_type"]], f[i["rcode"]], f[i["dns_id"]], f[i["server_port"]]) == (
        3,
        0,
        0x1234,
        53,
    )
    assert (f[i["cgroup_id"]], f[i["pid"]], f[i["qraw_len"]]) == (77, 10, 4)


def test_carrier_dns_fields_pack_at_their_offsets() -> None:
    assert (TAPIO_CONFIG.offsets["dns_slow_ns"], TAPIO_CONFIG.offsets["dns_ports"]) == (152, 176)
    raw = TapioConfig(
        dns_slow_ns=5, dns_timeout_ns=6, dns_flags=3, dns_ports=(53, 0, 5353, 70000, *range(1, 9))
    ).pack()
    f = TAPIO_CONFIG.struct.unpack(raw)
    i = TAPIO_CONFIG.index
    assert (f[i["dns_slow_ns"]], f[i["dns_timeout_ns"]], f[i["dns_flags"]]) == (5, 6, 3)
    # invalid ports are left out, the rest clamped to the carrier's 8 slots
    assert f[i["dns_port_count"]] == MAX_DNS_PORTS
    assert f[i["dns_ports"] : i["dns_ports"] + 8] == (53, 5353, 1, 2, 3, 4, 5, 6)
    assert raw[192:] == bytes(64)
