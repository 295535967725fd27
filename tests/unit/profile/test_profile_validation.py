"""Evidence Profile: closed schema, ranges, error paths and messages (docs/profile.md)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml

from tapio.profile import (
    PRODUCTION_DEFAULT_HASH,
    Profile,
    ProfileError,
    compile_profile,
    config_hash,
    load_profile,
    parse_document,
    production_default,
    validate,
)

HEADER = {
    "apiVersion": "tapio.false.systems/v0",
    "kind": "EvidenceProfile",
    "base": "production-default",
}


def doc(overrides: Any = None, **top: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(HEADER)
    d.update(top)
    if overrides is not None:
        d["overrides"] = overrides
    return d


def nested(path: str, value: Any) -> dict[str, Any]:
    """``nested("network.rtt_spike.ratio", 3)`` -> ``{"network": {"rtt_spike": {"ratio": 3}}}``."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    assert isinstance(out, dict)
    return out


def error_of(document: Any) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        validate(document)
    return info.value


# (override path, lowest, highest, rendered range) for every integer knob.
INT_RANGES = [
    ("network.rtt_spike.ratio", 1, 100, "1..=100"),
    ("network.rtt_spike.abs_ms", 1, 600000, "1..=600000"),
    ("network.retransmit.threshold", 1, 100000, "1..=100000"),
    ("network.retransmit.window_ms", 1, 600000, "1..=600000"),
    ("network.rtt_baseline.min_samples", 1, 1000, "1..=1000"),
    ("network.rtt_baseline.min_delta_ms", 0, 60000, "0..=60000"),
    ("network.rtt_baseline.sample_interval_ms", 1, 60000, "1..=60000"),
    ("storage.slow_io.warning_ms", 1, 60000, "1..=60000"),
    ("node.runq_latency_ms", 1, 10000, "1..=10000"),
]

FLOAT_RANGES = [
    ("node_pmc.stall_pct.warning", 0.0, 40.0, "0.0..=100.0"),  # upper bounded by critical 40
    ("node_pmc.ipc_degradation", 0.0, 16.0, "0.0..=16.0"),
    ("node.memory_pressure.some_pct", 0.0, 100.0, "0.0..=100.0"),
    ("node.memory_pressure.full_pct", 0.0, 100.0, "0.0..=100.0"),
    ("node.cpu_pressure.some_pct", 0.0, 100.0, "0.0..=100.0"),
    ("node.throttle_pct", 0.0, 100.0, "0.0..=100.0"),
    ("node.hysteresis_pct", 0.0, 100.0, "0.0..=100.0"),
]


@pytest.mark.parametrize(("path", "lo", "hi", "rendered"), INT_RANGES)
def test_int_range_edges(path: str, lo: int, hi: int, rendered: str) -> None:
    validate(doc(nested(path, lo)))
    if path != "storage.slow_io.warning_ms":  # warning above 200 would trip the order rule
        validate(doc(nested(path, hi)))
    for bad in (lo - 1, hi + 1):
        if path == "storage.slow_io.warning_ms" and bad == hi + 1:
            d = doc({"storage": {"slow_io": {"warning_ms": bad, "critical_ms": 600000}}})
        else:
            d = doc(nested(path, bad))
        err = error_of(d)
        assert err.path == f"overrides.{path}"
        assert str(err) == f"overrides.{path}: value {bad} out of range {rendered}"


def test_storage_critical_edges_and_order() -> None:
    validate(doc({"storage": {"slow_io": {"warning_ms": 1, "critical_ms": 1}}}))
    validate(doc({"storage": {"slow_io": {"warning_ms": 60000, "critical_ms": 600000}}}))
    assert str(error_of(doc(nested("storage.slow_io.critical_ms", 0)))) == (
        "overrides.storage.slow_io.critical_ms: value 0 out of range 1..=600000"
    )
    assert str(error_of(doc(nested("storage.slow_io.critical_ms", 600001)))) == (
        "overrides.storage.slow_io.critical_ms: value 600001 out of range 1..=600000"
    )
    # critical below the *inherited* warning (50) and warning above the inherited critical (200)
    assert str(error_of(doc(nested("storage.slow_io.critical_ms", 49)))) == (
        "overrides.storage.slow_io: 49 must be >= 50"
    )
    assert str(error_of(doc(nested("storage.slow_io.warning_ms", 201)))) == (
        "overrides.storage.slow_io: 200 must be >= 201"
    )


@pytest.mark.parametrize(("path", "lo", "hi", "rendered"), FLOAT_RANGES)
def test_float_range_edges(path: str, lo: float, hi: float, rendered: str) -> None:
    validate(doc(nested(path, lo)))
    validate(doc(nested(path, hi)))
    validate(doc(nested(path, int(hi))))  # an integer is a valid float
    top = 16.0 if "ipc" in path else 100.0
    for bad, shown in ((-0.5, "-0.5"), (top + 0.5, f"{int(top)}.5")):
        d = doc(nested(path, bad))
        if path == "node_pmc.stall_pct.warning":
            d = doc({"node_pmc": {"stall_pct": {"warning": bad, "critical": 100.0}}})
        assert str(error_of(d)) == f"overrides.{path}: value {shown} out of range {rendered}"
    for bad in (math.inf, -math.inf, math.nan):
        assert str(error_of(doc(nested(path, bad)))) == f"overrides.{path}: value must be finite"


def test_stall_order_uses_merged_values_and_rust_float_format() -> None:
    validate(doc({"node_pmc": {"stall_pct": {"warning": 40.0, "critical": 40.0}}}))
    assert str(error_of(doc(nested("node_pmc.stall_pct.warning", 50)))) == (
        "overrides.node_pmc.stall_pct: 40 must be >= 50"
    )
    assert str(error_of(doc(nested("node_pmc.stall_pct.critical", 12.5)))) == (
        "overrides.node_pmc.stall_pct: 12.5 must be >= 20"
    )
    assert str(error_of(doc(nested("node_pmc.stall_pct.critical", 100.5)))) == (
        "overrides.node_pmc.stall_pct.critical: value 100.5 out of range 0.0..=100.0"
    )


def test_large_float_printed_without_exponent() -> None:
    err = error_of(doc(nested("node.throttle_pct", 1e21)))
    assert str(err) == (
        "overrides.node.throttle_pct: value 1000000000000000000000 out of range 0.0..=100.0"
    )


def test_exit_codes_count_checked_before_range_and_dedup() -> None:
    codes = list(range(16))
    validate(doc({"container": {"ignore_exit_codes": codes}}))
    err = error_of(doc({"container": {"ignore_exit_codes": [*range(16), 999]}}))
    assert str(err) == "overrides.container.ignore_exit_codes: at most 16 ignore_exit_codes, got 17"
    validate(doc({"container": {"ignore_exit_codes": [0, 255]}}))
    assert str(error_of(doc({"container": {"ignore_exit_codes": [1, 256]}}))) == (
        "overrides.container.ignore_exit_codes[1]: value 256 out of range 0..=255"
    )
    assert str(error_of(doc({"container": {"ignore_exit_codes": [-1]}}))) == (
        "overrides.container.ignore_exit_codes[0]: value -1 out of range 0..=255"
    )
    compiled = compile_profile(validate(doc({"container": {"ignore_exit_codes": [3, 1, 3, 2, 1]}})))
    assert compiled.container.ignore_exit_codes == [3, 1, 2]


def test_ignore_signals_limits_and_dedup() -> None:
    validate(doc({"container": {"ignore_signals": [1, 64]}}))
    validate(doc({"container": {"ignore_signals": [9] * 64}}))
    assert str(error_of(doc({"container": {"ignore_signals": [9] * 65}}))) == (
        "overrides.container.ignore_signals: at most 64 ignore_signals, got 65"
    )
    for bad in (0, 65):
        assert str(error_of(doc({"container": {"ignore_signals": [15, bad]}}))) == (
            f"overrides.container.ignore_signals[1]: value {bad} out of range 1..=64"
        )
    compiled = compile_profile(validate(doc({"container": {"ignore_signals": [15, 9, 15, 2]}})))
    assert compiled.container.ignore_signals == [15, 9, 2]


@pytest.mark.parametrize("scope", ["auto", "containers", "all"])
def test_exit_scope_values(scope: str) -> None:
    compiled = compile_profile(validate(doc({"container": {"exit_scope": scope}})))
    assert compiled.container.exit_scope == scope


def test_exit_scope_rejects_other_strings() -> None:
    assert str(error_of(doc({"container": {"exit_scope": "Containers"}}))) == (
        'overrides.container.exit_scope: invalid value "Containers", '
        'expected one of "auto", "containers", "all"'
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            doc(apiVersion="v1"),
            'apiVersion: unsupported apiVersion Some("v1"), expected "tapio.false.systems/v0"',
        ),
        (
            {"kind": "EvidenceProfile", "base": "production-default"},
            'apiVersion: unsupported apiVersion None, expected "tapio.false.systems/v0"',
        ),
        (doc(kind="Profile"), 'kind: unsupported kind Some("Profile"), expected "EvidenceProfile"'),
        (
            {"apiVersion": "tapio.false.systems/v0", "base": "x"},
            'kind: unsupported kind None, expected "EvidenceProfile"',
        ),
        (
            {"apiVersion": "tapio.false.systems/v0", "kind": "EvidenceProfile"},
            "base: base profile is required",
        ),
        (doc(base=None), "base: base profile is required"),
        (doc(base="Prod"), 'base: invalid profile name "Prod"'),
        (doc(base="prod-"), 'base: invalid profile name "prod-"'),
        (doc(base="1prod"), 'base: invalid profile name "1prod"'),
        (doc(base=""), 'base: invalid profile name ""'),
        (doc(base="a" * 64), f'base: invalid profile name "{"a" * 64}"'),
        (
            doc(base="staging"),
            'base: unknown base profile "staging", available: ["production-default"]',
        ),
        (
            doc(base="a" * 63),
            f'base: unknown base profile "{"a" * 63}", available: ["production-default"]',
        ),
        (
            doc(apiVersion='x"y'),
            'apiVersion: unsupported apiVersion Some("x\\"y"), expected "tapio.false.systems/v0"',
        ),
    ],
)
def test_header_errors(document: dict[str, Any], message: str) -> None:
    assert str(error_of(document)) == message


def test_first_error_wins_in_the_documented_order() -> None:
    # network is checked before storage, ratio before abs_ms, header before everything.
    both = {
        "network": {"rtt_spike": {"abs_ms": 0, "ratio": 0}},
        "storage": {"slow_io": {"warning_ms": 0}},
    }
    assert error_of(doc(both)).path == "overrides.network.rtt_spike.ratio"
    assert error_of(doc(both, kind="x")).path == "kind"
    late = {"node": {"runq_latency_ms": 0}, "node_pmc": {"ipc_degradation": 99.0}}
    assert error_of(doc(late)).path == "overrides.node_pmc.ipc_degradation"


UNKNOWN_FIELD_CASES = [
    "bogus",
    "overrides.bogus",
    "overrides.network.bogus",
    "overrides.network.rtt_spike.bogus",
    "overrides.network.retransmit.bogus",
    "overrides.network.rtt_baseline.bogus",
    "overrides.storage.bogus",
    "overrides.storage.slow_io.bogus",
    "overrides.container.bogus",
    "overrides.node_pmc.bogus",
    "overrides.node_pmc.stall_pct.bogus",
    "overrides.node.bogus",
    "overrides.node.memory_pressure.bogus",
    "overrides.node.cpu_pressure.bogus",
]


@pytest.mark.parametrize("path", UNKNOWN_FIELD_CASES)
def test_unknown_fields_rejected_at_every_level(path: str) -> None:
    d = doc()
    d.update(nested(path, 1))
    err = error_of(d)
    assert err.path == path
    assert str(err) == f"{path}: unknown field"


def test_unknown_field_reported_in_document_order() -> None:
    d = doc({"network": {"zzz": 1, "rtt_spike": {"ratio": 0}}})
    assert str(error_of(d)) == "overrides.network.zzz: unknown field"


@pytest.mark.parametrize(
    ("path", "value", "expected", "got"),
    [
        ("overrides.network.enabled", "yes", "a boolean", "string"),
        ("overrides.network.enabled", 1, "a boolean", "integer"),
        ("overrides.network.rtt_spike.ratio", True, "an integer", "boolean"),
        ("overrides.network.rtt_spike.ratio", 2.5, "an integer", "float"),
        ("overrides.network.rtt_spike.ratio", "2", "an integer", "string"),
        ("overrides.network.rtt_spike", [1], "a mapping", "sequence"),
        ("overrides.network", "on", "a mapping", "string"),
        ("overrides", 5, "a mapping", "integer"),
        ("overrides.storage.slow_io.critical_ms", {"a": 1}, "an integer", "mapping"),
        ("overrides.container.ignore_exit_codes", 3, "a sequence", "integer"),
        ("overrides.container.ignore_signals", "9", "a sequence", "string"),
        ("overrides.container.exit_scope", 1, "a string", "integer"),
        ("overrides.node_pmc.ipc_degradation", "1.0", "a number", "string"),
        ("overrides.node_pmc.ipc_degradation", False, "a number", "boolean"),
        ("overrides.node.memory_pressure.some_pct", [], "a number", "sequence"),
        ("overrides.node.enabled", None, None, None),
        ("apiVersion", 0, "a string", "integer"),
        ("base", ["x"], "a string", "sequence"),
    ],
)
def test_wrong_types(path: str, value: Any, expected: str | None, got: str | None) -> None:
    d = doc()
    d.update(nested(path, value))
    if expected is None:  # null scalar = inherit
        validate(d)
        return
    err = error_of(d)
    assert str(err) == f"{path}: invalid type: expected {expected}, got {got}"


def test_list_element_type_error_has_index() -> None:
    err = error_of(doc({"container": {"ignore_exit_codes": [1, "2"]}}))
    assert (
        str(err)
        == "overrides.container.ignore_exit_codes[1]: invalid type: expected an integer, got string"
    )


def test_document_must_be_a_mapping() -> None:
    assert str(error_of([1])) == "invalid type: expected a mapping, got sequence"
    with pytest.raises(ProfileError):
        parse_document(None)


@pytest.mark.parametrize(
    "overrides",
    [
        None,
        {"network": None},
        {"network": None, "storage": None, "container": None, "node_pmc": None, "node": None},
        {"network": {"rtt_spike": None, "retransmit": None, "rtt_baseline": None}},
        {"storage": {"slow_io": None}},
        {"node_pmc": {"stall_pct": None, "ipc_degradation": None}},
        {"node": {"memory_pressure": None, "cpu_pressure": None, "runq_latency_ms": None}},
        {"container": {"ignore_exit_codes": None, "ignore_signals": None, "exit_scope": None}},
        {},
    ],
)
def test_null_blocks_are_empty_blocks(overrides: Any) -> None:
    d = doc()
    d["overrides"] = overrides
    assert config_hash(compile_profile(validate(d))) == PRODUCTION_DEFAULT_HASH


def test_yaml_null_block_and_duplicate_keys() -> None:
    text = (
        "apiVersion: tapio.false.systems/v0\nkind: EvidenceProfile\n"
        "base: production-default\noverrides:\n  network:\n"
    )
    assert config_hash(compile_profile(load_profile(text=text))) == PRODUCTION_DEFAULT_HASH
    dup = text + "    enabled: true\n    enabled: false\n"
    with pytest.raises(ProfileError, match="duplicate key 'enabled' at line 7"):
        load_profile(text=dup)


def test_yaml_syntax_errors_and_sizes(tmp_path: Any) -> None:
    with pytest.raises(ProfileError, match="invalid YAML"):
        load_profile(text="apiVersion: [unclosed\n")
    with pytest.raises(ProfileError, match="larger than"):
        load_profile(text="#" * (1 << 20 + 1))
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "missing.yaml")
    with pytest.raises(ProfileError, match="empty profile"):
        load_profile(text="")
    with pytest.raises(TypeError):
        load_profile()


def test_yaml_python_tags_are_refused() -> None:
    with pytest.raises(ProfileError, match="invalid YAML"):
        load_profile(text="apiVersion: !!python/object/apply:os.system ['true']\n")


def test_load_from_path(tmp_path: Any) -> None:
    p = tmp_path / "profile.yaml"
    p.write_text(yaml.safe_dump(doc({"network": {"rtt_spike": {"ratio": 3}}})))
    profile = load_profile(p)
    assert isinstance(profile, Profile)
    assert compile_profile(profile).network.rtt_spike_ratio == 3
    assert load_profile(str(p)) == profile


def test_validate_accepts_profile_struct_and_returns_it() -> None:
    profile = parse_document(doc())
    assert validate(profile) is profile
    assert compile_profile(profile) == production_default()
