"""Hypothesis fuzz: 10,000 random or mutated bodies against the POST routes over real TCP,
with agent authentication on (every request carries the right bearer token).

Invariants: never a 5xx, every error is the JSON envelope, and a rejected request (4xx, or a
heartbeat answered ``accepted: false``) leaves ``/v1/status`` unchanged apart from the
rejection totals (which may only grow). One server and one keep-alive connection
serve the whole run so it stays well under a minute.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapio.controller import Controller
from tapio.controller.auth import TokenFile

from .ctl_harness import ThreadServer, batch, capturing_logger, heartbeat, hello

ROUTES = ("/v1/agents/hello", "/v1/agents/heartbeat", "/v1/events")
REASONING = ("reasoning", "root_cause", "rootCause", "remediation", "explanation", "causalChain")
EXAMPLES = 10_000

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

TEMPLATES: dict[str, Any] = {
    "/v1/agents/hello": lambda agent: hello(agent),
    "/v1/agents/heartbeat": lambda agent: heartbeat(agent),
    "/v1/events": lambda agent: batch(agent, sequence=7, n=2),
}


@st.composite
def mutated(draw: st.DrawFn, route: str) -> bytes:
    agent = draw(st.sampled_from(["fz-1", "fz-2", "ghost", "", "  "]))
    doc: Any = TEMPLATES[route](agent)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["drop", "replace", "version", "blank", "reasoning", "events", "nest"])
        )
        if not isinstance(doc, dict):
            break
        if op == "drop" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif op == "replace" and doc:
            doc[draw(st.sampled_from(sorted(doc)))] = draw(json_value)
        elif op == "version":
            doc["wire_version"] = draw(
                st.sampled_from(["tapio-wire/v0", "tapio-wire/v2", "", 1, None])
            )
        elif op == "blank":
            doc[draw(st.sampled_from(["agent_id", "node_name", "config_version", "arch"]))] = draw(
                st.sampled_from(["", " ", "\t\n"])
            )
        elif (
            op == "reasoning"
            and isinstance(doc, dict)
            and isinstance(doc.get("events"), list)
            and doc["events"]
            and isinstance(doc["events"][0], dict)
        ):
            key = draw(st.sampled_from(REASONING))
            facts = draw(st.sampled_from([{key: 1}, {"a": [{"b": {key: "x"}}]}, [[{key: None}]]]))
            doc["events"][0]["facts"] = facts
        elif op == "events":
            doc["events"] = draw(st.one_of(st.just([]), st.lists(json_value, max_size=3)))
        elif op == "nest":
            doc = {"wrapped": doc} if draw(st.booleans()) else [doc]
    raw = msgspec.json.encode(doc)
    if draw(st.booleans()) and len(raw) > 2:  # truncate or flip a byte
        cut = draw(st.integers(0, len(raw) - 1))
        raw = (
            raw[:cut]
            if draw(st.booleans())
            else raw[:cut] + bytes([draw(st.integers(0, 255))]) + raw[cut + 1 :]
        )
    return raw


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, str]:
    route = draw(st.sampled_from(ROUTES))
    body = draw(
        st.one_of(
            mutated(route),
            mutated(route),
            st.binary(max_size=300),
            json_value.map(msgspec.json.encode),
        )
    )
    ctype = draw(
        st.sampled_from(
            ["application/json"] * 8 + ["text/plain", "", "application/json; charset=utf-8"]
        )
    )
    return route, body, ctype


TOKEN = "fuzz-token-0123456789abcdef"


class Session:
    def __init__(self, port: int) -> None:
        self.port = port
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str = ""
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": ctype, **self.auth} if ctype else dict(self.auth)
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def status(self) -> dict[str, Any]:
        code, raw = self.request("GET", "/v1/status")
        assert code == 200
        status: dict[str, Any] = msgspec.json.decode(raw)
        for agent in status["agents"]:
            agent.pop("last_heartbeat_age_seconds")  # time-dependent, not state
        return status


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    totals = {k: v for k, v in status["totals"].items() if "rejected" not in k}
    return {**status, "totals": totals}


def test_fuzz_post_routes_no_5xx_and_no_state_change_on_rejection(tmp_path: Path) -> None:
    log, cap = capturing_logger()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    controller = Controller(logger=log, stale_after=3600, token=TokenFile(token_file, logger=log))
    with ThreadServer(controller) as server:
        session = Session(server.port)
        for agent in ("fz-1", "fz-2"):
            assert (
                session.request(
                    "POST",
                    "/v1/agents/hello",
                    msgspec.json.encode(hello(agent)),
                    "application/json",
                )[0]
                == 200
            )
        state = {"status": session.status(), "count": 0, "rejected": 0}

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests())
        def fuzz(req: tuple[str, bytes, str]) -> None:
            route, body, ctype = req
            code, raw = session.request("POST", route, body, ctype)
            state["count"] += 1
            assert code < 500, (route, body, raw)
            payload = msgspec.json.decode(raw)
            rejected = code >= 400 or (
                route.endswith("heartbeat") and payload.get("accepted") is False
            )
            if code >= 400:
                assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}
            assert code in (200, 400, 409, 413, 422), (code, raw)
            if code == 409:  # a valid batch from an agent that never said hello
                assert route == "/v1/events" and payload["error"]["code"] == "UNKNOWN_AGENT"
            after = session.status()
            before = state["status"]
            if rejected:
                state["rejected"] += 1
                assert _comparable(after) == _comparable(before), (route, body, raw)
                for key in ("rejected_events_total", "batches_rejected_total"):
                    assert after["totals"][key] >= before["totals"][key]
            state["status"] = after

        fuzz()
    assert state["count"] >= EXAMPLES
    assert state["rejected"] > EXAMPLES // 2  # the fuzz mostly exercises rejection paths
    assert TOKEN not in repr(cap.calls)
