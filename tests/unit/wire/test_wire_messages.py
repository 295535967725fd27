"""tapio-wire/v1 Structs: round trips, validation errors, catch-alls, reasoning scan."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tapio import wire
from tapio.profile import PRODUCTION_DEFAULT_HASH, canonical_json, production_default

COUNTERS = {
    "events_total": 1,
    "malformed_events_total": 2,
    "lost_events_total": 3,
    "correlation_drops_total": 4,
    "sink_drops_total": 5,
    "controller_send_failures_total": 6,
}


def hello(**kw: Any) -> dict[str, Any]:
    base = {
        "wire_version": "tapio-wire/v1",
        "agent_id": "agent-1",
        "node_name": "node-a",
        "tapio_version": "0.1.0",
        "kernel_release": "6.18.0",
        "arch": "x86_64",
    }
    base.update(kw)
    return base


def heartbeat(**kw: Any) -> dict[str, Any]:
    base = {
        "wire_version": "tapio-wire/v1",
        "agent_id": "agent-1",
        "node_name": "node-a",
        "config_version": "1",
        "config_hash": PRODUCTION_DEFAULT_HASH,
        "uptime_seconds": 10,
        "observers": {
            "network": "running",
            "storage": "disabled",
            "container": "degraded",
            "node": "failed",
        },
        "counters": dict(COUNTERS),
        "degraded_reasons": ["unconfigured"],
    }
    base.update(kw)
    return base


def event(**kw: Any) -> dict[str, Any]:
    base = {
        "type": "kernel.network.connection_refused",
        "timestamp_unix_nanos": 1_700_000_000_000_000_000,
        "observer": "network",
        "severity": "warning",
        "facts": {"dst_port": 80, "addrs": ["10.0.0.1"]},
    }
    base.update(kw)
    return base


def batch(**kw: Any) -> dict[str, Any]:
    base = {
        "wire_version": "tapio-wire/v1",
        "agent_id": "agent-1",
        "node_name": "node-a",
        "sequence": 1,
        "sent_at_unix_nanos": 1_700_000_000_000_000_000,
        "events": [event()],
    }
    base.update(kw)
    return base


def dec(obj: Any, t: type[Any]) -> Any:
    return wire.decode(msgspec.json.encode(obj), t)


def raises(fn: Any, status: int, code: str, message: str) -> None:
    with pytest.raises(wire.WireError) as info:
        fn()
    assert (info.value.status, info.value.code, info.value.message) == (status, code, message)


def test_hello_round_trip_defaults_and_unknown_fields() -> None:
    msg = dec({**hello(), "future_field": {"x": 1}}, wire.HelloRequest)
    msg.validate()
    assert msg.capabilities == [] and msg.object_sizes == {} and msg.map_counts == {}
    again = wire.decode(wire.encode(msg), wire.HelloRequest)
    assert again == msg
    assert b"future_field" not in wire.encode(msg)


@pytest.mark.parametrize(
    "field", ["agent_id", "node_name", "tapio_version", "kernel_release", "arch"]
)
def test_hello_blank_strings(field: str) -> None:
    msg = dec(hello(**{field: "  \t"}), wire.HelloRequest)
    raises(msg.validate, 400, "MISSING_FIELD", f"{field} is required")


def test_hello_version_and_missing_field() -> None:
    raises(
        dec(hello(wire_version="tapio-wire/v2"), wire.HelloRequest).validate,
        400,
        "UNSUPPORTED_VERSION",
        "unsupported wire version tapio-wire/v2",
    )
    body = hello()
    del body["arch"]
    with pytest.raises(wire.WireError) as info:
        dec(body, wire.HelloRequest)
    assert (info.value.status, info.value.code) == (400, "MALFORMED_JSON")
    assert "arch" in info.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'{"wire_version": 1}',
        b"\xff\xfe",
        b'{"agent_id":"a"} trailing',
        b'{"wire_version":"\x80apio-wire/v1"}',
        b'{"\xc3":1}',
    ],
)
def test_decode_failures_are_malformed_json(raw: bytes) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.decode(raw, wire.HelloRequest)
    assert (info.value.status, info.value.code) == (400, "MALFORMED_JSON")


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    facts = b"[" * 200_000 + b"]" * 200_000
    raw = msgspec.json.encode(batch(events=[event(facts=None)])).replace(b"null", facts)
    with pytest.raises(wire.WireError) as info:
        wire.decode(raw, wire.EventBatchRequest)
    assert info.value.code == "MALFORMED_JSON"


def test_u64_bounds() -> None:
    ok = dec(batch(sequence=2**64 - 1), wire.EventBatchRequest)
    assert ok.sequence == 2**64 - 1
    for field in ("sequence", "sent_at_unix_nanos"):
        with pytest.raises(wire.WireError, match="u64"):
            dec(batch(**{field: 2**64}), wire.EventBatchRequest)
        with pytest.raises(wire.WireError):
            dec(batch(**{field: -1}), wire.EventBatchRequest)
    with pytest.raises(wire.WireError):
        dec(heartbeat(counters={**COUNTERS, "sink_drops_total": 2**64}), wire.HeartbeatRequest)
    with pytest.raises(wire.WireError):
        dec(hello(object_sizes={"x.o": 2**64}), wire.HelloRequest)


def test_heartbeat_round_trip_and_catch_alls() -> None:
    msg = dec(
        heartbeat(
            observers={"network": "hibernating", "node": "running"},
            degraded_reasons=["pmc_unsupported", "cosmic_rays"],
        ),
        wire.HeartbeatRequest,
    )
    msg.validate()
    assert msg.observers == {
        "network": wire.ObserverStatus.UNKNOWN,
        "node": wire.ObserverStatus.RUNNING,
    }
    assert msg.degraded_reasons == [
        wire.DegradedReason.PMC_UNSUPPORTED,
        wire.DegradedReason.UNKNOWN,
    ]
    out = msgspec.json.decode(wire.encode(msg))
    assert out["observers"] == {"network": "unknown", "node": "running"}
    assert out["degraded_reasons"] == ["pmc_unsupported", "unknown"]
    assert wire.decode(wire.encode(msg), wire.HeartbeatRequest) == msg


def test_heartbeat_validation() -> None:
    for field in ("agent_id", "node_name", "config_version"):
        raises(
            dec(heartbeat(**{field: ""}), wire.HeartbeatRequest).validate,
            400,
            "MISSING_FIELD",
            f"{field} is required",
        )
    raises(
        dec(heartbeat(observers={}), wire.HeartbeatRequest).validate,
        400,
        "MISSING_FIELD",
        "observers is required",
    )
    body = heartbeat()
    del body["config_hash"], body["degraded_reasons"]
    msg = dec(body, wire.HeartbeatRequest)
    msg.validate()
    assert msg.config_hash == "" and msg.degraded_reasons == []
    with pytest.raises(wire.WireError):
        dec(heartbeat(observers={"network": 1}), wire.HeartbeatRequest)


def test_event_severity_catch_all() -> None:
    msg = dec(batch(events=[event(severity="apocalyptic")]), wire.EventBatchRequest)
    msg.validate(256)
    assert msg.events[0].severity is wire.EventSeverity.UNKNOWN
    assert msgspec.json.decode(wire.encode(msg))["events"][0]["severity"] == "unknown"


def test_batch_validation() -> None:
    with pytest.raises(wire.WireError) as info:
        dec(batch(events=[]), wire.EventBatchRequest).validate(256)
    assert (info.value.code, info.value.message) == ("MISSING_FIELD", "events is required")
    msg = dec(batch(events=[event()] * 3), wire.EventBatchRequest)
    msg.validate(3)
    with pytest.raises(wire.WireError) as info:
        msg.validate(2)
    assert (info.value.status, info.value.code, info.value.message) == (
        400,
        "INVALID_FIELD",
        "events: batch exceeds max_batch_events",
    )
    with pytest.raises(wire.WireError) as info:
        dec(batch(events=[event(type="user.thing")]), wire.EventBatchRequest).validate(256)
    assert info.value.message == "type: must be a kernel.* event"
    with pytest.raises(wire.WireError) as info:
        dec(batch(events=[event(observer=" ")]), wire.EventBatchRequest).validate(256)
    assert info.value.message == "observer is required"
    with pytest.raises(wire.WireError) as info:
        dec(batch(wire_version="tapio-wire/v0"), wire.EventBatchRequest).validate(256)
    assert info.value.code == "UNSUPPORTED_VERSION"


@pytest.mark.parametrize(
    ("facts", "path"),
    [
        ({"reasoning": 1}, "$.reasoning"),
        ({"a": {"b": {"rootCause": "x"}}}, "$.a.b.rootCause"),
        ({"a": [1, {"b": 2}, {"root_cause": "x"}]}, "$.a[2].root_cause"),
        ([{"x": [[{"remediation": 1}]]}], "$[0].x[0][0].remediation"),
        ({"z": {"explanation": 1}, "a": {"recommendation": 1}}, "$.a.recommendation"),
        ({"suggested_fix": 1, "causal_chain": 2}, "$.causal_chain"),
        ({"a": [{"possibleCauses": []}], "b": {"suggestedFix": 1}}, "$.a[0].possibleCauses"),
        ({"x": {"causalChain": None}}, "$.x.causalChain"),
        ({"possible_causes": 0}, "$.possible_causes"),
    ],
)
def test_reasoning_scan(facts: Any, path: str) -> None:
    assert wire.find_reasoning_field(facts) == path
    with pytest.raises(wire.WireError) as info:
        dec(batch(events=[event(), event(facts=facts)]), wire.EventBatchRequest).validate(256)
    assert (info.value.status, info.value.code) == (422, "REASONING_FIELD")
    assert info.value.message == f"event facts contain reasoning field {path}"


@pytest.mark.parametrize(
    "facts",
    [
        None,
        1,
        "reasoning",
        ["root_cause"],
        {"value": "remediation"},
        {"Reasoning": 1},
        {"rootcause": 1},
    ],
)
def test_reasoning_scan_only_matches_keys(facts: Any) -> None:
    assert wire.find_reasoning_field(facts) is None


def test_reasoning_scan_deep_structure_is_iterative() -> None:
    facts: Any = {"root_cause": 1}
    for _ in range(5000):
        facts = [facts]
    assert wire.find_reasoning_field(facts) == "$" + "[0]" * 5000 + ".root_cause"


def test_config_response_round_trip_uses_compiled_config() -> None:
    msg = wire.ConfigResponse(
        wire_version=wire.WIRE_VERSION,
        version="7",
        config_hash=PRODUCTION_DEFAULT_HASH,
        config=production_default(),
        batching=wire.Batching(send_interval_ms=1000, max_batch_events=256),
    )
    raw = wire.encode(msg)
    assert canonical_json(production_default()) in raw
    back = wire.decode(raw, wire.ConfigResponse)
    back.validate()
    assert back == msg and back.generation() == 7
    keys = list(msgspec.json.decode(raw))
    assert keys == ["wire_version", "version", "config_hash", "config", "batching"]


def test_config_response_validation() -> None:
    def make(**kw: Any) -> wire.ConfigResponse:
        c = production_default()
        for key, value in kw.items():
            section, field = key.split("__")
            setattr(getattr(c, section), field, value)
        return wire.ConfigResponse(
            wire_version=wire.WIRE_VERSION,
            version="1",
            config=c,
            batching=wire.Batching(send_interval_ms=1, max_batch_events=1),
        )

    make().validate()  # empty hash is only the agent's concern
    raises(
        make(storage__slow_io_warning_ns=0).validate,
        400,
        "INVALID_FIELD",
        "config.storage.slow_io_warning_ns: must be greater than zero",
    )
    raises(
        make(storage__slow_io_critical_ns=0).validate,
        400,
        "INVALID_FIELD",
        "config.storage.slow_io_critical_ns: must be greater than zero",
    )
    raises(
        make(container__exit_scope="everything").validate,
        400,
        "INVALID_FIELD",
        "config.container.exit_scope: unknown scope 'everything'",
    )
    msg = make()
    msg.batching = wire.Batching(send_interval_ms=0, max_batch_events=1)
    raises(
        msg.validate, 400, "INVALID_FIELD", "batching.send_interval_ms: must be greater than zero"
    )
    msg.batching = wire.Batching(send_interval_ms=1, max_batch_events=0)
    raises(
        msg.validate, 400, "INVALID_FIELD", "batching.max_batch_events: must be greater than zero"
    )
    for bad in ("", "x", "-1", "4294967296", "١"):
        msg = make()
        msg.version = bad
        with pytest.raises(wire.WireError):
            msg.generation()
    msg.version = "4294967295"
    assert msg.generation() == 2**32 - 1


def test_hello_and_heartbeat_responses() -> None:
    resp = wire.HelloResponse(
        wire_version=wire.WIRE_VERSION,
        accepted=True,
        controller_id="c",
        config_version="1",
        send_interval_ms=1000,
        max_batch_events=256,
    )
    assert wire.decode(wire.encode(resp), wire.HelloResponse) == resp
    resp.validate()
    for field, value, msg in [
        ("controller_id", " ", "controller_id is required"),
        ("config_version", "", "config_version is required"),
        ("send_interval_ms", 0, "send_interval_ms: must be greater than zero"),
        ("max_batch_events", 0, "max_batch_events: must be greater than zero"),
    ]:
        bad = msgspec.structs.replace(resp, **{field: value})
        with pytest.raises(wire.WireError, match=msg):
            bad.validate()
    hb = wire.HeartbeatResponse(
        wire_version=wire.WIRE_VERSION, accepted=False, next_config_version="3"
    )
    assert wire.decode(wire.encode(hb), wire.HeartbeatResponse) == hb
    hb.validate()
    raises(
        msgspec.structs.replace(hb, next_config_version="").validate,
        400,
        "MISSING_FIELD",
        "next_config_version is required",
    )


def test_status_response_additive_fields_default_for_older_payloads() -> None:
    older_status = {
        "wire_version": "tapio-wire/v1",
        "controller_id": "tapio-controller/default",
        "started_at_unix": 1,
        "config": {"version": "1", "config_hash": PRODUCTION_DEFAULT_HASH},
        "totals": {
            "accepted_events_total": 0,
            "rejected_events_total": 0,
            "batches_accepted_total": 0,
            "batches_rejected_total": 0,
        },
        "agents": [
            {
                "agent_id": "a",
                "node_name": "n",
                "tapio_version": "4.0.0",
                "registered_at_unix": 1,
                "last_heartbeat_age_seconds": None,
                "reported_config_version": "",
                "reported_counters": COUNTERS,
                "observers": {},
                "sequence": {"last_seen": None, "gaps_total": 0, "regressions_total": 0},
            }
        ],
    }
    msg = dec(older_status, wire.StatusResponse)
    assert msg.stale_agents == [] and msg.unconverged_agents == []
    assert msg.agents[0].reported_config_hash == ""
    assert wire.decode(wire.encode(msg), wire.StatusResponse) == msg


def test_error_envelope_shape() -> None:
    err = wire.WireError.reasoning_field("$.a")
    assert (
        wire.encode(err.envelope()) == b'{"error":{"code":"REASONING_FIELD",'
        b'"message":"event facts contain reasoning field $.a"}}'
    )
    assert (
        wire.WireError.unknown_endpoint().status,
        wire.WireError.payload_too_large().status,
    ) == (404, 413)
    assert wire.WireError.internal().code == "INTERNAL_ERROR"
