from __future__ import annotations

import pytest

import tapio.occurrence as occurrence
from tapio.occurrence import (
    Occurrence,
    decode,
    encode,
    encode_pretty,
    format_timestamp,
    new_occurrence,
    new_ulid,
    parse_timestamp,
    ulid_time_ms,
)


def test_timestamp_format_is_the_contract_format() -> None:
    assert format_timestamp(0) == "1970-01-01T00:00:00+00:00"
    assert format_timestamp(1705314600_123456789) == "2024-01-15T10:30:00.123456789+00:00"
    assert format_timestamp(1705314600_000000001) == "2024-01-15T10:30:00.000000001+00:00"


def test_parse_timestamp_offsets_and_z() -> None:
    assert parse_timestamp("2024-01-15T10:30:00.123456789+00:00") == 1705314600_123456789
    assert parse_timestamp("2024-01-15T10:30:00Z") == 1705314600_000000000
    assert parse_timestamp("2024-01-15T12:30:00.5+02:00") == 1705314600_500000000
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_ulid_shape_time_and_uniqueness() -> None:
    ids = {new_ulid(1705314600123) for _ in range(5000)}
    assert len(ids) == 5000
    for u in list(ids)[:10]:
        assert len(u) == 26 and ulid_time_ms(u) == 1705314600123
        assert set(u) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_ulid_time_prefix_is_the_48_bit_time_in_crockford_base32() -> None:
    """The table-driven prefix against the definition: ten 5-bit digits, most significant
    first, for the edges of every digit and for times past and far ahead."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    values = [0, 1, 31, 32, 1023, 1024, 2**48 - 1, 1705314600123, 1764627205123]
    values += [(1 << b) - 1 for b in range(1, 49)] + [1 << b for b in range(48)]
    for ms in values:
        want = "".join(alphabet[(ms >> shift) & 31] for shift in range(45, -5, -5))
        assert occurrence._time_prefix(ms) == want
        assert ulid_time_ms(new_ulid(ms)) == ms
    assert occurrence._time_prefix(2**48 + 5) == occurrence._time_prefix(5)  # 48 bits, wraps


def test_key_order_omitted_fields_and_sorted_data() -> None:
    occ = new_occurrence(
        "kernel.node.cpu_stall",
        "critical",
        "in_progress",
        code="C",
        message="m",
        data={"b": 1, "a": 2},
        timestamp_ns=0,
    )
    raw = encode(occ)
    assert raw.index(b'"id"') < raw.index(b'"timestamp"') < raw.index(b'"source"')
    assert raw.index(b'"type"') < raw.index(b'"severity"') < raw.index(b'"outcome"')
    assert b'"data":{"a":2,"b":1}' in raw
    assert b"context" not in raw and b"reasoning" not in raw
    assert encode_pretty(occ).startswith(b'{\n  "id"')


@pytest.mark.parametrize("bad", ["kernel.network", "kernel..x", "a.b.c.d", ""])
def test_validate_rejects_bad_types(bad: str) -> None:
    occ = new_occurrence("kernel.network.connection_refused", "warning", "failure")
    raw = encode(occ).replace(b"kernel.network.connection_refused", bad.encode())
    with pytest.raises(ValueError):
        decode(raw)


def test_decode_ignores_unknown_keys() -> None:
    occ = new_occurrence("kernel.network.connection_refused", "warning", "failure")
    raw = encode(occ)[:-1] + b',"future":1}'
    assert isinstance(decode(raw), Occurrence)
