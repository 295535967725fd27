"""Compile and canonical hash: pinned bytes, omit-if-default, determinism, unit conversions."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio.profile import (
    DEFAULT_PROFILE_YAML,
    PRODUCTION_DEFAULT_HASH,
    CompiledConfig,
    NodeConfig,
    canonical_json,
    compile_profile,
    config_hash,
    load_profile,
    production_default,
    validate,
)
from tapio.profile.compiled import round_half_away

PRODUCTION_DEFAULT_BYTES = (
    b'{"network":{"enabled":true,"rtt_spike_ratio":2,"rtt_spike_abs_us":500000,'
    b'"rtt_min_baseline_samples":5,"conn_refused_window_ns":0,"conn_refused_min_count":0},'
    b'"storage":{"enabled":true,"slow_io_warning_ns":50000000,"slow_io_critical_ns":200000000},'
    b'"container":{"enabled":true,"ignore_exit_codes":[]},'
    b'"node_pmc":{"enabled":true,"stall_warning_permille":200,"stall_critical_permille":400,'
    b'"ipc_degradation_milli":1000}}'
)
HEADER = {
    "apiVersion": "tapio.false.systems/v0",
    "kind": "EvidenceProfile",
    "base": "production-default",
}


def compiled(overrides: dict[str, Any]) -> CompiledConfig:
    return compile_profile(validate({**HEADER, "overrides": overrides}))


def test_production_default_bytes_and_hash() -> None:
    c = production_default()
    assert canonical_json(c) == PRODUCTION_DEFAULT_BYTES
    assert config_hash(c) == PRODUCTION_DEFAULT_HASH
    assert (
        "sha256:" + hashlib.sha256(PRODUCTION_DEFAULT_BYTES).hexdigest() == PRODUCTION_DEFAULT_HASH
    )
    assert PRODUCTION_DEFAULT_HASH.endswith(
        "845b719f50052b222e79a6f0a9e091e4fe5cc62f8049f7a9089cf20175f5ddef"
    )
    from_yaml = compile_profile(load_profile(text=DEFAULT_PROFILE_YAML))
    assert canonical_json(from_yaml) == PRODUCTION_DEFAULT_BYTES
    # plain msgspec encoding agrees with the canonical walk (what the wire sends)
    assert msgspec.json.encode(from_yaml) == PRODUCTION_DEFAULT_BYTES


def test_overriding_with_default_values_keeps_the_pinned_hash() -> None:
    c = compiled(
        {
            "network": {
                "enabled": True,
                "rtt_spike": {"ratio": 2, "abs_ms": 500},
                "retransmit": {"threshold": 5, "window_ms": 1000},
                "rtt_baseline": {"min_samples": 5, "min_delta_ms": 5, "sample_interval_ms": 100},
            },
            "container": {"exit_scope": "auto", "ignore_signals": []},
            "node": {
                "enabled": True,
                "memory_pressure": {"some_pct": 10.0, "full_pct": 5},
                "cpu_pressure": {"some_pct": 50.0},
                "runq_latency_ms": 50,
                "throttle_pct": 20.0,
                "hysteresis_pct": 50.0,
            },
        }
    )
    assert canonical_json(c) == PRODUCTION_DEFAULT_BYTES
    assert config_hash(c) == PRODUCTION_DEFAULT_HASH
    assert msgspec.json.encode(c) == PRODUCTION_DEFAULT_BYTES


def test_new_knobs_compile_and_appear_only_when_changed() -> None:
    c = compiled(
        {
            "network": {
                "retransmit": {"threshold": 7, "window_ms": 250},
                "rtt_baseline": {"min_samples": 9, "min_delta_ms": 0, "sample_interval_ms": 1},
            },
            "container": {"exit_scope": "all", "ignore_signals": [9, 15, 9]},
            "node": {"memory_pressure": {"some_pct": 12.34}, "runq_latency_ms": 10000},
        }
    )
    n = c.network
    assert (n.retransmit_threshold, n.retransmit_window_ns) == (7, 250_000_000)
    assert (n.rtt_min_baseline_samples, n.rtt_min_delta_us, n.rtt_sample_interval_us) == (
        9,
        0,
        1000,
    )
    assert (c.container.exit_scope, c.container.ignore_signals) == ("all", [9, 15])
    assert c.node.memory_some_permille == 123
    assert c.node.runq_latency_ns == 10_000_000_000
    text = canonical_json(c)
    assert text == (
        b'{"network":{"enabled":true,"rtt_spike_ratio":2,"rtt_spike_abs_us":500000,'
        b'"rtt_min_baseline_samples":9,"conn_refused_window_ns":0,"conn_refused_min_count":0,'
        b'"retransmit_threshold":7,"retransmit_window_ns":250000000,"rtt_min_delta_us":0,'
        b'"rtt_sample_interval_us":1000},'
        b'"storage":{"enabled":true,"slow_io_warning_ns":50000000,"slow_io_critical_ns":200000000},'
        b'"container":{"enabled":true,"ignore_exit_codes":[],"exit_scope":"all","ignore_signals":[9,15]},'
        b'"node_pmc":{"enabled":true,"stall_warning_permille":200,"stall_critical_permille":400,'
        b'"ipc_degradation_milli":1000},'
        b'"node":{"memory_some_permille":123,"runq_latency_ns":10000000000}}'
    )
    assert config_hash(c) != PRODUCTION_DEFAULT_HASH


def test_node_block_after_node_pmc_and_defaults_inside_omitted() -> None:
    c = compiled({"node": {"enabled": False}})
    assert canonical_json(c).endswith(b'"ipc_degradation_milli":1000},"node":{"enabled":false}}')
    assert c.node == NodeConfig(enabled=False)


def test_original_knobs_and_unit_conversions() -> None:
    c = compiled(
        {
            "network": {"enabled": False, "rtt_spike": {"ratio": 100, "abs_ms": 600000}},
            "storage": {"enabled": False, "slow_io": {"warning_ms": 60000, "critical_ms": 600000}},
            "container": {"enabled": False, "ignore_exit_codes": [1, 255]},
            "node_pmc": {
                "enabled": False,
                "stall_pct": {"warning": 0.05, "critical": 100},
                "ipc_degradation": 0.0005,
            },
        }
    )
    assert (c.network.enabled, c.network.rtt_spike_ratio, c.network.rtt_spike_abs_us) == (
        False,
        100,
        600_000_000,
    )
    assert (c.storage.slow_io_warning_ns, c.storage.slow_io_critical_ns) == (
        60_000_000_000,
        600_000_000_000,
    )
    assert c.container.ignore_exit_codes == [1, 255]
    # half away from zero, as Rust's f64::round: 0.05*10 = 0.5 -> 1; 0.0005*1000 = 0.5 -> 1
    assert (c.node_pmc.stall_warning_permille, c.node_pmc.stall_critical_permille) == (1, 1000)
    assert c.node_pmc.ipc_degradation_milli == 1
    assert not c.node_pmc.enabled


def test_round_half_away() -> None:
    assert [round_half_away(x) for x in (0.0, 0.49, 0.5, 1.5, 2.5, 2.4999, 1000.0)] == [
        0,
        0,
        1,
        2,
        3,
        2,
        1000,
    ]


def test_canonical_json_is_value_based_after_mutation() -> None:
    c = production_default()
    c.network.retransmit_window_ns = 2_000_000_000
    c.network.retransmit_window_ns = 1000 * 1_000_000  # back to default, a distinct int object
    assert canonical_json(c) == PRODUCTION_DEFAULT_BYTES


def test_decode_round_trip_of_extended_config() -> None:
    c = compiled({"node": {"throttle_pct": 33.3}, "container": {"ignore_signals": [2]}})
    back = msgspec.json.decode(canonical_json(c), type=CompiledConfig)
    assert back == c
    assert canonical_json(back) == canonical_json(c)
    # an older controller's config (none of the newer fields) decodes with the defaults
    ref = msgspec.json.decode(PRODUCTION_DEFAULT_BYTES, type=CompiledConfig)
    assert ref == production_default()
    assert ref.network.retransmit_threshold == 5 and ref.node.enabled


_pct = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.integers(1, 100),
    some=_pct,
    signals=st.lists(st.integers(1, 64), max_size=64),
    codes=st.lists(st.integers(0, 255), max_size=16),
    window=st.integers(1, 600000),
)
def test_compile_is_deterministic(
    ratio: int, some: float, signals: list[int], codes: list[int], window: int
) -> None:
    overrides = {
        "network": {"rtt_spike": {"ratio": ratio}, "retransmit": {"window_ms": window}},
        "container": {"ignore_signals": signals, "ignore_exit_codes": codes},
        "node": {"cpu_pressure": {"some_pct": some}},
    }
    a, b = compiled(overrides), compiled(overrides)
    assert canonical_json(a) == canonical_json(b)
    assert config_hash(a) == config_hash(b)
    assert msgspec.json.encode(a) == canonical_json(a)
    assert 0 <= a.node.cpu_some_permille <= 1000


def test_hash_stable_across_processes() -> None:
    code = (
        "from tapio.profile import *; "
        "print(config_hash(compile_profile(load_profile(text=DEFAULT_PROFILE_YAML))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == PRODUCTION_DEFAULT_HASH


def test_compiled_module_is_cheap_to_import() -> None:
    code = "import sys, tapio.wire, tapio.profile.compiled; print('yaml' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "False"
