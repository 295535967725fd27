"""The evidence window and ``GET /v1/evidence``: bounds, filters, cursor paging, bad queries
answered with the wire error envelope, and the agent token in front of it all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapio.cli.store import Filter
from tapio.controller import Controller
from tapio.controller.auth import TokenFile
from tapio.controller.evidence import EvidenceWindow
from tapio.controller.evidence.window import ENTRY_OVERHEAD, cost
from tapio.controller.forward.record import Record
from tapio.controller.metrics import ControllerMetrics

from .ctl_harness import JSON, ThreadServer, batch, capturing_logger, enc, event, hello, running
from .evidence_harness import T0, auth, send_standard
from .scheduler_harness import clock_at

TOKEN = "evidence-token-" + "7" * 24


def rec(i: int, body: bytes = b"{}", **kw: Any) -> Record:
    return Record(
        id=f"id-{i:06d}",
        type="kernel.network.connection_refused",
        node_name="n",
        body=body,
        ts_ns=T0 + i,
        severity="warning",
        **kw,
    )


def evicted(m: ControllerMetrics, reason: str) -> float:
    value: float = m.window_evicted.labels(reason)._value.get()
    return value


def test_window_bounds_count_age_bytes_and_duplicates() -> None:
    m, clock = ControllerMetrics(), clock_at(100.0)
    w = EvidenceWindow(max_events=5, max_age=60, max_bytes=10**6, metrics=m, clock=clock)
    w.add([rec(i) for i in range(8)])
    assert len(w) == 5 and evicted(m, "count") == 3
    assert [r.id for r in w.query(Filter(), 10).records] == [f"id-{i:06d}" for i in range(7, 2, -1)]
    w.add([rec(7)])  # the same occurrence again (a re-sent batch): not twice
    assert len(w) == 5 and m.window_duplicates._value.get() == 1
    clock.now += 61
    assert w.query(Filter(), 10).records == [] and evicted(m, "age") == 5
    assert w.bytes == 0 and m.window_events._value.get() == 0

    big = b"x" * 1000
    size = cost(rec(0, big))
    assert size >= ENTRY_OVERHEAD + 1000 + 8 * 49
    w = EvidenceWindow(max_events=100, max_age=60, max_bytes=3 * size, metrics=m, clock=clock)
    w.add([rec(i, big) for i in range(10)])
    assert len(w) == 3 and w.bytes <= 3 * size and evicted(m, "bytes") == 7
    w.add([rec(99, b"y" * (4 * size))])  # larger than the whole window: not kept
    assert len(w) == 3 and m.window_bytes._value.get() == w.bytes
    with pytest.raises(ValueError):
        EvidenceWindow(max_events=0)


async def _controller(token: bool = True, tmp_path: Path | None = None) -> Controller:
    tf = None
    if token:
        assert tmp_path is not None
        (tmp_path / "token").write_text(TOKEN + "\n")
        tf = TokenFile(tmp_path / "token")
    log, _ = capturing_logger()
    return Controller(logger=log, token=tf)


async def _get(s: aiohttp.ClientSession, url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    async with s.get(url, headers=auth(token)) as r:
        return r.status, await r.json()


def _ports(body: dict[str, Any]) -> list[int]:
    return [d["data"].get("dst_port", 0) for d in body["evidence"]]


async def test_filters_and_the_cursor(tmp_path: Path) -> None:
    ctl = await _controller(tmp_path=tmp_path)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        await send_standard(s, url, auth(TOKEN))
        ev = url + "/v1/evidence"
        status, body = await _get(s, ev)
        assert status == 200 and body["matched"] == 6 and body["returned"] == 6
        assert _ports(body) == [0, 1004, 1003, 1002, 1001, 1000]  # newest first
        assert body["window"]["events"] == 6 and "next_cursor" not in body
        doc = body["evidence"][1]
        assert doc["node_name"] == "node-c" and doc["data"]["pod_namespace"] == "payments"
        assert "occurrence_id" not in doc["data"] and doc["id"] == "01TESTOCC00000000000000004"
        cases = {
            "namespace=payments": [1004, 1003, 1002],
            "namespace=payments&pod=pay-1": [1004, 1002],
            "workload=pay": [1004, 1002],
            "workload=StatefulSet/ledger": [1003],
            "workload=deployment/ledger": [],
            "node=node-a,node-c": [0, 1004, 1001, 1000],
            "node=node-a&node=node-b": [1003, 1002, 1001, 1000],
            "type=kernel.container.oom_kill": [1003, 1002],
            "observer=network": [1004, 1001, 1000],
            "severity=critical,error": [0, 1004, 1003, 1002],
            "min_severity=error": [0, 1004, 1003, 1002],
            "since=2027-01-15T08:00:02Z": [0, 1004, 1003, 1002],
            "until=2027-01-15T08:00:01%2B00:00": [1001, 1000],
            "since=1h": [0, 1004, 1003, 1002, 1001, 1000],  # T0 lies ahead of now
            "namespace=payments&severity=critical": [1003, 1002],
            "namespace=nowhere": [],
        }
        for q, want in cases.items():
            status, body = await _get(s, f"{ev}?{q}")
            assert (status, _ports(body)) == (200, want), q
            assert body["matched"] == len(want)
        # paging: three pages of two, no repeats, no gaps
        seen: list[int] = []
        cursor = ""
        for _ in range(4):
            status, body = await _get(s, f"{ev}?limit=2" + (f"&cursor={cursor}" if cursor else ""))
            assert status == 200
            seen += _ports(body)
            cursor = body.get("next_cursor", "")
            if not cursor:
                break
            assert body["truncated"] is False and body["returned"] == 2
        assert seen == [0, 1004, 1003, 1002, 1001, 1000]
        status, body = await _get(s, f"{ev}?namespace=payments&limit=1")
        status, body = await _get(
            s, f"{ev}?namespace=payments&limit=5&cursor={body['next_cursor']}"
        )
        assert _ports(body) == [1003, 1002]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("bogus=1", "bogus"),
        ("since=yesterday", "since"),
        ("until=2024-01-01T00:00:00", "until"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-3", "limit"),
        ("limit=1&limit=2", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=WzEsMl0", "cursor"),
        ("severity=fatal", "severity"),
        ("min_severity=loud", "min_severity"),
        ("namespace=", "namespace"),
        ("pod=a,,b", "pod"),
        ("node=" + "n" * 300, "node"),
        ("type=" + ",".join(["t"] * 65), "type"),
    ],
)
async def test_bad_queries_get_the_wire_error_envelope(
    tmp_path: Path, query: str, field: str
) -> None:
    ctl = await _controller(tmp_path=tmp_path)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        status, body = await _get(s, f"{url}/v1/evidence?{query}")
        assert status == 400
        assert body["error"]["code"] == "INVALID_FIELD"
        assert body["error"]["message"].startswith(f"{field}:")


async def test_token_required_and_state_unchanged(tmp_path: Path) -> None:
    ctl = await _controller(tmp_path=tmp_path)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        await send_standard(s, url, auth(TOKEN))
        for token in (None, "wrong-token"):
            status, body = await _get(s, url + "/v1/evidence", token)
            assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
            assert TOKEN not in str(body)
        status, body = await _get(s, url + "/v1/evidence")
        assert status == 200 and body["matched"] == 6


async def test_only_accepted_batches_enter_the_window(tmp_path: Path) -> None:
    """A batch refused (unknown agent, invalid) adds nothing; a re-sent batch adds nothing."""
    ctl = await _controller(token=False)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        body = batch("ghost", 1, events=[event()])
        async with s.post(url + "/v1/events", data=enc(body), headers=JSON) as r:
            assert r.status == 409
        async with s.post(url + "/v1/agents/hello", data=enc(hello()), headers=JSON) as r:
            assert r.status == 200
        bad = batch(events=[event(type="no-dots")])
        async with s.post(url + "/v1/events", data=enc(bad), headers=JSON) as r:
            assert r.status >= 400
        assert len(ctl.window) == 0
        good = batch(events=[event(facts={"occurrence_id": "01RESENT0000000000000000AA"})])
        for seq in (1, 1):
            good["sequence"] = seq
            async with s.post(url + "/v1/events", data=enc(good), headers=JSON) as r:
                assert r.status == 200
        assert len(ctl.window) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "since",
                    "until",
                    "type",
                    "observer",
                    "severity",
                    "min_severity",
                    "node",
                    "namespace",
                    "pod",
                    "workload",
                    "container_id",
                    "pod_uid",
                    "limit",
                    "cursor",
                    "x",
                ]
            ),
            st.text(max_size=40),
        ),
        max_size=6,
    )
)
def test_random_queries_never_crash(params: list[tuple[str, str]]) -> None:
    global _SERVER
    if _SERVER is None:
        log, _ = capturing_logger()
        _SERVER = ThreadServer(Controller(logger=log)).__enter__()
    import urllib.error
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{_SERVER.port}/v1/evidence?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    assert status in (200, 400), raw
    doc = msgspec.json.decode(raw)
    assert ("evidence" in doc) if status == 200 else (doc["error"]["code"] == "INVALID_FIELD")


_SERVER: ThreadServer | None = None


def teardown_module() -> None:
    if _SERVER is not None:
        _SERVER.__exit__(None, None, None)


class _OneByOne:
    """The window's rule applied record by record with one entry per record: what the
    batch-level window must be indistinguishable from."""

    def __init__(self, max_events: int, max_age: float, max_bytes: int) -> None:
        self.max_events, self.max_age, self.max_bytes = max_events, max_age, max_bytes
        self.entries: list[tuple[float, int, Record]] = []
        self.evicted = {"count": 0, "bytes": 0, "age": 0}
        self.duplicates = 0

    def add(self, now: float, records: list[Record]) -> None:
        while self.entries and self.entries[0][0] < now - self.max_age:
            self.entries.pop(0)
            self.evicted["age"] += 1
        for r in records:
            if r.id in {e[2].id for e in self.entries}:
                self.duplicates += 1
                continue
            size = cost(r)
            if size > self.max_bytes:
                self.evicted["bytes"] += 1
                continue
            while len(self.entries) >= self.max_events:
                self.entries.pop(0)
                self.evicted["count"] += 1
            while sum(e[1] for e in self.entries) + size > self.max_bytes:
                self.entries.pop(0)
                self.evicted["bytes"] += 1
            self.entries.append((now, size, r))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.lists(
        st.tuples(
            st.integers(0, 40),  # seconds the clock moves before this batch
            st.lists(st.tuples(st.integers(0, 30), st.integers(0, 900)), max_size=15),
        ),
        max_size=12,
    ),
)
def test_the_batch_window_keeps_and_evicts_exactly_as_record_by_record(
    max_events: int, byte_entries: int, batches: list[tuple[int, list[tuple[int, int]]]]
) -> None:
    unit = cost(rec(0))
    max_bytes = byte_entries * (unit + 300)
    m, clock = ControllerMetrics(), clock_at(1000.0)
    w = EvidenceWindow(
        max_events=max_events, max_age=60, max_bytes=max_bytes, metrics=m, clock=clock
    )
    model = _OneByOne(max_events, 60, max_bytes)
    for step, records in batches:
        clock.now += step
        recs = [rec(i, b"x" * pad) for i, pad in records]  # ids repeat: duplicates
        w.add(recs)
        model.add(clock.now, recs)
        kept = [e[2] for e in model.entries]
        assert len(w) == len(kept) and w.bytes == sum(e[1] for e in model.entries)
        got = w.query(Filter(), 1000).records
        assert [r.id for r in got] == [r.id for r in sorted(kept, key=lambda r: r.ts_ns)][::-1]
        assert all(g is k for g, k in zip(got, sorted(kept, key=lambda r: -r.ts_ns), strict=True))
        for reason, n in model.evicted.items():
            assert evicted(m, reason) == n
        assert m.window_duplicates._value.get() == model.duplicates
        assert m.window_events._value.get() == len(kept) and m.window_bytes._value.get() == w.bytes
