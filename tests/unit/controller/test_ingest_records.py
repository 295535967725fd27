"""Records built at ingest encode their documents only when sent, and send the same bytes.

``ingest_records`` keeps each event's JSON as received; ``document()`` (the evidence
endpoints) and ``seal()`` (the forwarders) must produce exactly what ``build_records`` encodes
at once, for every shape of event, and the window must charge what a record holds.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tapio import wire
from tapio.controller.batch import decode_batch, full
from tapio.controller.evidence import EvidenceWindow
from tapio.controller.evidence.window import _FIXED_COST, _STRING_FIELDS, cost
from tapio.controller.forward import Forwarder, ingest_records
from tapio.controller.forward.record import Record, build_records, held_bytes
from tapio.controller.metrics import ControllerMetrics

from .ctl_harness import batch, enc, event

SHAPES: list[dict[str, Any]] = [
    # what a Tapio agent sends: id, outcome and error inside the facts
    {
        "occurrence_id": "01ABCDEFGHJKMNPQRSTVWXYZ00",
        "outcome": "failure",
        "error_code": "RST_RECEIVED",
        "error_message": "TCP RST 10.0.0.2:40000 → 10.0.0.1:443",
        "pid": 1234,
        "comm": "curl",
    },
    {"dst_port": 6},  # no id: a content id
    {"occurrence_id": "x" * 129, "dst_port": 7},  # too long to be a key: a content id
    {"occurrence_id": 5, "dst_port": 8},  # not a string: a content id
    {"occurrence_id": "", "outcome": 3},
    {"pod_namespace": "payments", "pod_name": "pay-1", "workload_kind": "Deployment"},
    {"workload_name": "ledger", "nested": {"a": [1, {"b": None}]}, "list": [1.5, "x"]},
]


def _decoded(events: list[dict[str, Any]]) -> tuple[wire.EventBatchRequest, bytes]:
    body = enc(batch(events=events))
    decoded = wire.decode(body, wire.EventBatchRequest)
    decoded.validate(1000)
    return decoded, body


def test_lazy_documents_are_the_eager_bytes_for_every_shape() -> None:
    events = [event(facts=f) for f in SHAPES]
    events += [event(facts=[1, 2]), event(facts="text"), event(facts=None)]
    events.append(event(severity="no-such-severity", facts={"k": "v"}))
    decoded, body = _decoded(events)
    eager = build_records(decoded)
    lazy = ingest_records(decoded, body)
    assert len(lazy) == len(eager) == len(events)
    for e, rec in zip(eager, lazy, strict=True):
        assert rec.body == b"" and rec.event and rec.origin is not None
        assert (rec.id, rec.type, rec.node_name, rec.ts_ns, rec.severity) == (
            e.id,
            e.type,
            e.node_name,
            e.ts_ns,
            e.severity,
        )
        assert (rec.namespace, rec.pod, rec.workload_kind, rec.workload_name) == (
            e.namespace,
            e.pod,
            e.workload_kind,
            e.workload_name,
        )
        assert rec.document() == e.body and rec.document() == e.body  # not cached, stable
        assert rec.body == b""
        assert rec.seal() == e.body
        assert rec.body == e.body and rec.event == b"" and rec.origin is None
        assert rec.document() == e.body and rec.seal() == e.body
    assert lazy[0].id == "01ABCDEFGHJKMNPQRSTVWXYZ00"
    assert all(r.id.startswith("sha256-") for r in lazy[1:5])
    assert lazy[5].namespace == "payments" and lazy[5].pod == "pay-1"
    doc = msgspec.json.decode(eager[0].body)
    assert doc["error"]["code"] == "RST_RECEIVED" and "occurrence_id" not in doc["data"]


def test_the_event_kept_is_the_agents_json_as_received() -> None:
    decoded, body = _decoded([event(facts=f) for f in SHAPES[:2]])
    for rec, sent in zip(ingest_records(decoded, body), SHAPES[:2], strict=True):
        assert msgspec.json.decode(rec.event)["facts"] == sent
        assert rec.event in body


def test_enriched_records_are_encoded_at_once() -> None:
    decoded, body = _decoded([event(facts={"pod_uid": "u-1", "dst_port": 1})])

    def enrich(data: dict[str, Any]) -> dict[str, Any]:
        return {"pod_name": "p", "pod_namespace": "ns", "dst_port": 99}

    (rec,) = ingest_records(decoded, body, enrich)
    assert rec.origin is None and rec.event == b"" and rec.pod == "p" and rec.namespace == "ns"
    assert msgspec.json.decode(rec.body)["data"] == {
        "dst_port": 1,  # the agent's fact is never overwritten
        "pod_name": "p",
        "pod_namespace": "ns",
        "pod_uid": "u-1",
    }


def test_cost_counts_what_a_record_holds() -> None:
    decoded, body = _decoded([event(facts=f) for f in SHAPES])
    for rec in ingest_records(decoded, body):
        strings = sum(len(getattr(rec, name)) for name in _STRING_FIELDS)
        before = cost(rec)
        assert before == _FIXED_COST + len(rec.event) + strings
        rec.seal()
        assert cost(rec) == _FIXED_COST + len(rec.body) + strings


async def test_forwarded_records_are_sealed_before_the_window_charges_them() -> None:
    class Sink:
        name = "sink"

        async def connect(self) -> None: ...

        async def deliver(self, records: Any) -> list[bool]:
            return [True] * len(records)

        async def close(self) -> None: ...

    m = ControllerMetrics()
    fwd = Forwarder([Sink()], m, None)
    window = EvidenceWindow(metrics=m)
    decoded, body = _decoded([event(facts=f) for f in SHAPES])
    records = ingest_records(decoded, body)
    eager = build_records(decoded)
    assert fwd.offer(records)
    window.add(records)
    assert [r.body for r in records] == [e.body for e in eager]
    assert all(r.event == b"" for r in records)
    assert window.bytes == sum(cost(e) for e in eager)


def test_window_charges_unsealed_records_by_their_event() -> None:
    decoded, body = _decoded([event(facts=f) for f in SHAPES])
    records = ingest_records(decoded, body)
    window = EvidenceWindow(max_events=3)
    window.add(records)
    assert len(window) == 3 and window.bytes == sum(cost(r) for r in records[-3:])


@pytest.mark.parametrize(
    ("facts", "path"),
    [
        ({"reasoning": "x"}, "$.reasoning"),
        ({"a": {"root_cause": 1}}, "$.a.root_cause"),
        ({"a": [{"b": 1}, {"remediation": 2}]}, "$.a[1].remediation"),
        ([{"explanation": 1}], "$[0].explanation"),
    ],
)
def test_a_batch_with_one_reasoning_event_is_refused_whatever_its_neighbours(
    facts: Any, path: str
) -> None:
    events = [event(), event(facts=facts), event()]
    decoded = wire.decode(enc(batch(events=events)), wire.EventBatchRequest)
    with pytest.raises(wire.WireError) as err:
        decoded.validate(1000)
    assert err.value.code == "REASONING_FIELD" and err.value.message.endswith(path)


@pytest.mark.parametrize(
    ("bad", "code", "field"),
    [
        ({"type": " "}, "MISSING_FIELD", "type"),
        ({"observer": ""}, "MISSING_FIELD", "observer"),
        ({"type": "user.thing"}, "INVALID_FIELD", "type"),
    ],
)
def test_the_first_bad_event_of_a_batch_names_its_error(
    bad: dict[str, Any], code: str, field: str
) -> None:
    events = [event(), event(**bad), event(facts={"reasoning": 1})]
    decoded = wire.decode(enc(batch(events=events)), wire.EventBatchRequest)
    with pytest.raises(wire.WireError) as err:
        decoded.validate(1000)
    assert err.value.code == code and field in err.value.message


AGENT_FACTS: list[dict[str, Any]] = [
    {**SHAPES[0], "occurrence_id": f"01ABCDEFGHJKMNPQRSTVWX{i:04d}", "dst_port": i}
    for i in range(5)
]


def _records_fields(records: list[Record]) -> list[tuple[Any, ...]]:
    return [msgspec.structs.astuple(r) for r in records]


def test_an_agents_batch_decodes_once_into_the_same_batch_and_records() -> None:
    events = [event(facts=f) for f in AGENT_FACTS]
    events.append(event(severity="no-such-severity", facts={"occurrence_id": "z", "f": 1.5}))
    body = enc(batch(events=events))
    clean, flat = decode_batch(body), full(body)
    general = wire.decode(body, wire.EventBatchRequest)
    assert (clean.facts_proven, flat.facts_proven, general.facts_proven) == ("clean", "flat", "")
    assert msgspec.to_builtins(flat) == msgspec.to_builtins(general)
    assert [e.facts.occurrence_id for e in clean.events] == [
        f["occurrence_id"] for f in [*AGENT_FACTS, {"occurrence_id": "z"}]
    ]
    for decoded in (clean, flat, general):
        decoded.validate(1000)
    fast, slow = ingest_records(clean, body), ingest_records(general, body)
    assert _records_fields(fast) == _records_fields(slow)
    assert _records_fields(ingest_records(flat, body)) == _records_fields(slow)
    assert fast[-1].severity == "unknown" and fast[0].id == AGENT_FACTS[0]["occurrence_id"]
    eager = build_records(general)
    for rec, e in zip(fast, eager, strict=True):
        assert rec.held == held_bytes(rec) and cost(rec) == _FIXED_COST + held_bytes(rec)
        assert rec.seal() == e.body and rec.held == held_bytes(rec)  # kept by seal


@pytest.mark.parametrize(
    ("facts", "proven"),
    [
        ({"nested": {"a": 1}}, ""),  # not flat: decoded as any batch is
        ({"list": [1]}, ""),
        ({"text": "a {brace} and [bracket]"}, "flat"),  # not proven by the brackets
        ({"occurrence_id": 5}, "clean"),  # not a string id: a content id, record by record
        ({"occurrence_id": "x" * 129}, "clean"),
        ({"dst_port": 1}, "clean"),  # no id at all
        ({"occurrence_id": "a", "pod_name": "p"}, "clean"),  # a filter fact
        ({"occurrence_id": "a", "workload_kind": 3}, "clean"),
    ],
)
def test_batches_off_the_fast_paths_give_the_same_records(
    facts: dict[str, Any], proven: str
) -> None:
    events = [event(facts=AGENT_FACTS[0]), event(facts=facts)]
    body = enc(batch(events=events))
    decoded = decode_batch(body)
    assert decoded.facts_proven == proven
    decoded.validate(1000)
    got = ingest_records(decoded, body)
    want = ingest_records(wire.decode(body, wire.EventBatchRequest), body)
    assert _records_fields(got) == _records_fields(want)
    assert [r.document() for r in got] == [e.body for e in build_records(full(body))]


BAD_BODIES: list[bytes] = [
    b"{",
    b"[]",
    enc(batch(events=[event(), event(timestamp_unix_nanos=2**64)])),
    enc(batch(events=[event(timestamp_unix_nanos=-1)])),
    enc(batch(sequence=2**64)),
    enc(batch(events=[event(type=5)])),
    enc(batch(events=[event(facts={"a": "PLACEHOLDER"})])).replace(b"PLACEHOLDER", b"\xff"),
    enc(batch(events=[event(facts={"a": 1})])).replace(b'"a"', b'"\xff"'),
    enc(batch(events=[event(facts=[{"reasoning": 1}])])),  # decodes; validate refuses it
    enc(batch(events=[event(), event(facts={"reasoning": None, "a": 1})])),
    enc(batch(events=[event(facts={"a": {"root_cause": 1}})])),
    enc(batch(events=[event(facts={"ok": 1}), event(type="user.x", facts={"rootCause": 1})])),
    enc(batch(events=[event(facts={"suggestedFix": "x"}), event(type="user.x")])),
    enc(batch(events=[event(facts={"a": 1})])).replace(b'"a":1', b'"a":tru'),
    enc(batch(events=[event(facts={"a": 1})])).replace(b'"a":1', b'"a":01'),
    enc(batch(events=[event(facts={"a": 1})])).replace(b'"a":1', b'"a":"\\x"'),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_bad_batch_gets_the_error_decoding_it_always_gave(body: bytes) -> None:
    def outcome(decode: Any) -> tuple[str, str]:
        try:
            decoded = decode(body)
            decoded.validate(1000)
        except wire.WireError as err:
            return err.code, err.message
        return "ok", ""

    want = outcome(lambda b: wire.decode(b, wire.EventBatchRequest))
    assert want[0] != "ok"
    assert outcome(decode_batch) == want and outcome(full) == want


def test_an_out_of_range_timestamp_names_its_event() -> None:
    body = enc(batch(events=[event(), event(), event(timestamp_unix_nanos=2**64)]))
    with pytest.raises(wire.WireError) as err:
        decode_batch(body)
    assert err.value.code == "MALFORMED_JSON"
    assert err.value.message.endswith(
        "`timestamp_unix_nanos` exceeds the u64 range - at `$.events[2]`"
    )
    ok = decode_batch(enc(batch(events=[event(timestamp_unix_nanos=2**64 - 1)])))
    assert ok.events[0].timestamp_unix_nanos == 2**64 - 1


def test_a_batch_to_enrich_is_decoded_with_its_facts_whole_once() -> None:
    body = enc(batch(events=[event(facts={"pod_uid": "u-1", "dst_port": 1})]))
    clean = decode_batch(body)
    whole = decode_batch(body, facts=True)
    assert clean.facts_proven == "clean"
    assert whole.facts_proven == "flat"
    assert whole.events[0].facts == {"pod_uid": "u-1", "dst_port": 1}
    assert whole == full(body)
