"""Agent authentication on the controller over real TCP: 401 envelopes that change nothing,
open probe routes, live token rotation, hostile Authorization headers, no token in logs."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from tapio.controller import Controller
from tapio.controller.auth import TokenFile, TokenFileError

from .ctl_harness import JSON, batch, capturing_logger, enc, heartbeat, hello, running

TOKEN = "s3cret-Token_0123456789abcdefXYZ"
NEW_TOKEN = "rotated-Token_9876543210zyxwvuTSR"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Ctl:
    def __init__(self, session: aiohttp.ClientSession, url: str, controller: Controller) -> None:
        self.session = session
        self.url = url
        self.controller = controller

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        data = None if body is None else enc(body)
        hdrs = {**(JSON if body is not None else {}), **(headers or {})}
        async with self.session.request(method, self.url + path, data=data, headers=hdrs) as r:
            raw = await r.read()
            try:
                decoded = msgspec.json.decode(raw) if raw else None
            except msgspec.DecodeError:
                decoded = raw
            return r.status, decoded, r.headers

    async def status(self) -> dict[str, Any]:
        code, body, _ = await self.call("GET", "/v1/status", headers=auth())
        assert code == 200
        for agent in body["agents"]:
            agent.pop("last_heartbeat_age_seconds")
        result: dict[str, Any] = body
        return result


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def logs() -> tuple[Any, Any]:
    return capturing_logger()


@pytest.fixture
async def ctl(token_file: Path, logs: tuple[Any, Any]) -> AsyncIterator[Ctl]:
    log, cap = logs
    controller = Controller(
        logger=log, token=TokenFile(token_file, check_interval=0.05, logger=log)
    )
    async with (
        running(controller) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s,
    ):
        yield Ctl(s, url, controller)
    # Nothing this controller logged, in any test of this module, names the token.
    text = repr(cap.calls)
    assert TOKEN not in text and NEW_TOKEN not in text


ROUTES = [
    ("POST", "/v1/agents/hello", hello("intruder", node_name="prod-node-7")),
    ("POST", "/v1/agents/heartbeat", heartbeat("agent-1", uptime_seconds=99)),
    ("GET", "/v1/agents/config?agent_id=agent-1&node_name=node-a", None),
    ("POST", "/v1/events", batch("agent-1", sequence=2, n=3)),
    ("GET", "/v1/status", None),
    ("GET", "/v1/nonexistent", None),
]
BAD_HEADERS = [
    {},
    auth("wrong-token"),
    auth(TOKEN[:-1]),
    auth(TOKEN + "x"),
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": TOKEN},
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_v1_without_valid_token_is_401_and_changes_nothing(
    ctl: Ctl, method: str, path: str, body: Any
) -> None:
    assert (await ctl.call("POST", "/v1/agents/hello", hello(), auth()))[0] == 200
    assert (await ctl.call("POST", "/v1/events", batch(sequence=1), auth()))[0] == 200
    before = await ctl.status()
    for headers in BAD_HEADERS:
        code, payload, resp_headers = await ctl.call(method, path, body, headers)
        assert code == 401, (headers, payload)
        assert payload["error"]["code"] == "UNAUTHORIZED"
        assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}
        assert resp_headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in repr(payload)
    assert await ctl.status() == before
    failures = ctl.controller.metrics.auth_failures
    assert failures.labels("missing")._value.get() == 1
    assert failures.labels("invalid")._value.get() == len(BAD_HEADERS) - 1


async def test_valid_token_works_end_to_end_and_probes_stay_open(ctl: Ctl) -> None:
    assert (await ctl.call("POST", "/v1/agents/hello", hello(), auth()))[0] == 200
    code, _, headers = await ctl.call(
        "GET", "/v1/agents/config?agent_id=agent-1&node_name=node-a", headers=auth()
    )
    assert code == 200 and headers["ETag"]
    code, body, _ = await ctl.call("POST", "/v1/agents/heartbeat", heartbeat(), auth())
    assert code == 200 and body["accepted"] is True
    code, body, _ = await ctl.call("POST", "/v1/events", batch(n=4), auth())
    assert code == 200 and body["accepted"] == 4
    assert (await ctl.status())["totals"]["accepted_events_total"] == 4
    # scheme is case-insensitive (RFC 9110), the token is not
    assert (await ctl.call("GET", "/v1/status", headers={"Authorization": f"bearer {TOKEN}"}))[
        0
    ] == 200
    assert (await ctl.call("GET", "/v1/status", headers=auth(TOKEN.upper())))[0] == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        code, raw, _ = await ctl.call("GET", path)
        assert code == 200, path
        assert TOKEN.encode() not in (raw if isinstance(raw, bytes) else enc(raw))


async def _wait_accepts(ctl: Ctl, token: str) -> None:
    for _ in range(200):
        if (await ctl.call("GET", "/v1/status", headers=auth(token)))[0] == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("rotated token never accepted")


async def test_rotated_token_file_is_picked_up_without_restart(
    ctl: Ctl, token_file: Path, logs: tuple[Any, Any]
) -> None:
    assert (await ctl.call("GET", "/v1/status", headers=auth()))[0] == 200
    # atomic replace (new inode), as an editor or a config manager does
    tmp = token_file.with_suffix(".new")
    tmp.write_text(NEW_TOKEN + "\n")
    os.replace(tmp, token_file)
    await _wait_accepts(ctl, NEW_TOKEN)
    assert (await ctl.call("GET", "/v1/status", headers=auth()))[0] == 401
    # a half-written (empty) Secret keeps the token in force rather than locking everyone out
    token_file.write_text("")
    await asyncio.sleep(0.15)
    assert (await ctl.call("GET", "/v1/status", headers=auth(NEW_TOKEN)))[0] == 200
    _, cap = logs
    assert any("unusable" in str(c.kwargs.get("event", c.args)) for c in cap.calls)
    token_file.write_text(TOKEN)
    await _wait_accepts(ctl, TOKEN)
    assert ctl.controller.token is not None and ctl.controller.token.rotations == 2


async def test_kubernetes_secret_symlink_swap_is_a_rotation(tmp_path: Path) -> None:
    # A Secret volume: token -> ..data/token, ..data -> ..<timestamp>; an update swaps ..data.
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "token").write_text(TOKEN)
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "token").symlink_to("..data/token")
    clock = [0.0]
    tf = TokenFile(tmp_path / "token", check_interval=1.0, clock=lambda: clock[0])
    assert tf.verify(f"Bearer {TOKEN}") is None
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "token").write_text(NEW_TOKEN)
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert tf.verify(f"Bearer {NEW_TOKEN}") == "invalid"  # not re-checked before the interval
    clock[0] = 1.0
    assert tf.verify(f"Bearer {NEW_TOKEN}") is None
    assert tf.verify(f"Bearer {TOKEN}") == "invalid"


def test_unusable_token_file_is_refused_at_start(tmp_path: Path) -> None:
    for content in (b"", b"  \n", b"two words", b"x" * 5000):
        (tmp_path / "t").write_bytes(content)
        with pytest.raises(TokenFileError) as err:
            TokenFile(tmp_path / "t")
        assert "two words" not in str(err.value)
    with pytest.raises(TokenFileError):
        TokenFile(tmp_path / "missing")


async def test_2000_random_authorization_headers_all_401_controller_stays_up(ctl: Ctl) -> None:
    rng = random.Random(12)
    alphabet = [chr(c) for c in range(0x21, 0x7F)]

    def candidate() -> str:
        kind = rng.randrange(6)
        tail = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        if kind == 0:
            return "Bearer " + tail
        if kind == 1:  # the real token with one character changed
            i = rng.randrange(len(TOKEN))
            return "Bearer " + TOKEN[:i] + rng.choice("!#$%") + TOKEN[i + 1 :]
        if kind == 2:
            return "Bearer " + TOKEN[: rng.randrange(len(TOKEN))]
        if kind == 3:
            return rng.choice(["Basic ", "Token ", "", "Bearer\t", "BEARER  "]) + tail
        if kind == 4:
            return " ".join("".join(rng.choice(alphabet) for _ in range(5)) for _ in range(3))
        return "Bearer " + TOKEN + rng.choice(alphabet) + tail

    routes = [r for r in ROUTES if r[1] != "/v1/nonexistent"]
    sem = asyncio.Semaphore(16)
    codes: list[int] = []

    async def one(i: int) -> None:
        method, path, body = routes[i % len(routes)]
        async with sem:
            codes.append((await ctl.call(method, path, body, {"Authorization": candidate()}))[0])

    await asyncio.gather(*(one(i) for i in range(2000)))
    assert len(codes) == 2000 and set(codes) == {401}
    assert (await ctl.call("GET", "/healthz"))[0] == 200
    status = await ctl.status()
    assert status["agents"] == [] and status["totals"]["batches_accepted_total"] == 0
