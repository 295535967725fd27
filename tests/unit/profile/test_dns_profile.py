"""The ``overrides.network.dns`` block: ranges, merged-value rules, compile, and the carrier."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tapio.agent.kconfig import from_compiled, standalone_config
from tapio.agent.settings import AgentSettings
from tapio.bpf.abi import DNS_ENABLED, DNS_NXDOMAIN
from tapio.profile import (
    PRODUCTION_DEFAULT_HASH,
    ProfileError,
    compile_profile,
    config_hash,
    validate,
)
from tapio.profile.compiled import canonical_json
from tapio.thresholds import Thresholds
from tapio.wire import Batching, ConfigResponse, WireError

HEADER = {
    "apiVersion": "tapio.false.systems/v0",
    "kind": "EvidenceProfile",
    "base": "production-default",
}


def dns(**block: Any) -> dict[str, Any]:
    return {**HEADER, "overrides": {"network": {"dns": block}}}


def error_of(document: Any) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        validate(document)
    return info.value


@pytest.mark.parametrize(
    ("field", "lo", "hi"),
    [
        ("timeout_ms", 101, 60000),
        ("slow_ms", 1, 4999),
        ("window_ms", 0, 600000),
        ("cap", 1, 100000),
    ],
)
def test_integer_ranges(field: str, lo: int, hi: int) -> None:
    compile_profile(validate(dns(**{field: lo})))
    compile_profile(validate(dns(**{field: hi})))
    bounds = {
        "timeout_ms": "100..=60000",
        "slow_ms": "1..=60000",
        "window_ms": "0..=600000",
        "cap": "1..=100000",
    }[field]
    low = {"timeout_ms": 99, "slow_ms": 0, "window_ms": -1, "cap": 0}[field]
    e = error_of(dns(**{field: low}))
    assert str(e) == f"overrides.network.dns.{field}: value {low} out of range {bounds}"


def test_slow_must_be_below_the_merged_timeout() -> None:
    e = error_of(dns(slow_ms=5000))
    assert str(e) == "overrides.network.dns.slow_ms: 5000 must be < timeout_ms 5000"
    e = error_of(dns(timeout_ms=200, slow_ms=300))
    assert str(e) == "overrides.network.dns.slow_ms: 300 must be < timeout_ms 200"
    compile_profile(validate(dns(timeout_ms=200, slow_ms=199)))


def test_ports_bounded_in_range_and_deduplicated() -> None:
    c = compile_profile(validate(dns(ports=[5353, 53, 5353])))
    assert c.network.dns_ports == (5353, 53)
    assert str(error_of(dns(ports=[]))) == "overrides.network.dns.ports: at least 1 port, got 0"
    e = error_of(dns(ports=list(range(1, 10))))
    assert str(e) == "overrides.network.dns.ports: at most 8 ports, got 9"
    e = error_of(dns(ports=[53, 65536]))
    assert str(e) == "overrides.network.dns.ports[1]: value 65536 out of range 1..=65535"
    assert "ports[0]" in str(error_of(dns(ports=[0])))


def test_unknown_field_and_wrong_types_rejected_with_their_path() -> None:
    assert "overrides.network.dns" in str(error_of(dns(timeout=5)))
    assert "overrides.network.dns.enabled" in str(error_of(dns(enabled="yes")))
    assert "overrides.network.dns.ports" in str(error_of(dns(ports=53)))


def test_defaults_keep_the_pinned_hash_and_bytes() -> None:
    same = compile_profile(
        validate(
            dns(
                enabled=True,
                ports=[53],
                timeout_ms=5000,
                slow_ms=100,
                include_nxdomain=False,
                window_ms=5000,
                cap=100,
            )
        )
    )
    assert config_hash(same) == PRODUCTION_DEFAULT_HASH
    assert b"dns" not in canonical_json(same)
    assert msgspec.json.encode(same) == canonical_json(same)


def test_compiled_block_reaches_the_carrier_and_the_thresholds() -> None:
    c = compile_profile(
        validate(
            dns(
                ports=[53, 5353],
                timeout_ms=2000,
                slow_ms=250,
                include_nxdomain=True,
                window_ms=0,
                cap=7,
            )
        )
    )
    assert b'"dns_ports":[53,5353]' in canonical_json(c)
    kernel, user = from_compiled(c, 12, kubernetes=False)
    assert kernel.generation == 12
    assert kernel.dns_ports == (53, 5353) and kernel.dns_flags == DNS_ENABLED | DNS_NXDOMAIN
    assert (kernel.dns_slow_ns, kernel.dns_timeout_ns) == (250_000_000, 2_000_000_000)
    assert (user.dns_timeout_ms, user.dns_window_ms, user.dns_cap) == (2000, 0, 7)
    off = compile_profile(validate(dns(enabled=False)))
    assert from_compiled(off, 1, kubernetes=False)[0].dns_flags == 0


def test_wire_refuses_out_of_range_dns_values() -> None:
    c = compile_profile(validate(dns()))
    c.network.dns_slow_ns = c.network.dns_timeout_ns
    resp = ConfigResponse(
        wire_version="1.0",
        version="1",
        config=c,
        batching=Batching(send_interval_ms=1, max_batch_events=1),
    )
    with pytest.raises(WireError):
        resp.validate()


def test_standalone_toml_thresholds() -> None:
    s = msgspec.convert(
        {"thresholds": {"dns_ports": [53, 853], "dns_slow_ms": 50, "dns_include_nxdomain": True}},
        AgentSettings,
    )
    k = standalone_config(s, ["network"], generation=3)
    assert k.dns_ports == (53, 853) and k.dns_slow_ns == 50_000_000
    assert k.dns_flags == DNS_ENABLED | DNS_NXDOMAIN and k.dns_timeout_ns == 5_000_000_000
    with pytest.raises(msgspec.ValidationError, match="dns_slow_ms"):
        msgspec.convert({"dns_slow_ms": 6000}, Thresholds)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"dns_ports": []}, Thresholds)
