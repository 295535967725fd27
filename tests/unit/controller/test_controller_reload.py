"""Profile reload: file poll, SIGHUP (in-process), bad profiles keep the previous config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from tapio.controller import Controller
from tapio.controller.cli import main, parse_address, serve
from tapio.profile import DEFAULT_PROFILE_YAML, PRODUCTION_DEFAULT_HASH

from ...ports import reported_port
from .ctl_harness import JSON, capturing_logger, enc, heartbeat, hello, running

RATIO_3 = DEFAULT_PROFILE_YAML + "overrides:\n  network:\n    rtt_spike:\n      ratio: 3\n"
RATIO_4 = DEFAULT_PROFILE_YAML + "overrides:\n  network:\n    rtt_spike:\n      ratio: 4\n"
BAD = DEFAULT_PROFILE_YAML + "overrides:\n  network:\n    rtt_spike:\n      ratio: 0\n"


async def _status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/v1/status") as r:
        result: dict[str, Any] = msgspec.json.decode(await r.read())
        return result


async def _wait_version(
    session: aiohttp.ClientSession, url: str, version: str, within: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status = await _status(session, url)
        if status["config"]["version"] == version or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.02)


async def test_file_change_bumps_generation_and_bad_profile_keeps_config(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(DEFAULT_PROFILE_YAML)
    log, cap = capturing_logger()
    ctl = Controller(profile_path=str(path), reload_poll_seconds=0.05, logger=log)
    async with running(ctl) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/v1/agents/hello", data=enc(hello()), headers=JSON)
        await s.post(url + "/v1/agents/heartbeat", data=enc(heartbeat()), headers=JSON)
        assert (await _status(s, url))["unconverged_agents"] == []

        path.write_text(RATIO_3)
        status = await _wait_version(s, url, "2")
        assert status["config"]["version"] == "2"
        new_hash = status["config"]["config_hash"]
        assert new_hash != PRODUCTION_DEFAULT_HASH
        assert status["unconverged_agents"] == ["agent-1"]  # still reports the old hash
        async with s.get(
            url + "/v1/agents/config?agent_id=agent-1&node_name=n",
            headers={"If-None-Match": f'"{PRODUCTION_DEFAULT_HASH}"'},
        ) as r:
            assert r.status == 200 and r.headers["ETag"] == f'"{new_hash}"'
            body = msgspec.json.decode(await r.read())
            assert body["version"] == "2" and body["config"]["network"]["rtt_spike_ratio"] == 3
        async with s.post(
            url + "/v1/agents/heartbeat", data=enc(heartbeat(config_hash=new_hash)), headers=JSON
        ) as r:
            assert (await r.json())["next_config_version"] == "2"
        assert (await _status(s, url))["unconverged_agents"] == []

        path.write_text(BAD)
        await asyncio.sleep(0.3)
        status = await _status(s, url)
        assert status["config"] == {"version": "2", "config_hash": new_hash}
        failures = [
            c for c in cap.calls if c.kwargs.get("event", "").startswith("profile rejected")
        ]
        assert len(failures) == 1  # logged once, not every poll
        assert (
            failures[0].kwargs["reason"]
            == "overrides.network.rtt_spike.ratio: value 0 out of range 1..=100"
        )

        path.write_text(RATIO_3 + "# a comment changes nothing compiled\n")
        await asyncio.sleep(0.3)
        assert (await _status(s, url))["config"]["version"] == "2"

        path.unlink()
        await asyncio.sleep(0.3)
        assert (await _status(s, url))["config"]["version"] == "2"

        path.write_text(RATIO_4)
        status = await _wait_version(s, url, "3")
        assert status["config"]["version"] == "3"
        async with s.get(url + "/metrics") as r:
            text = await r.text()
        assert 'tapio_controller_profile_reloads_total{result="applied"} 2.0' in text
        assert "tapio_controller_config_generation 3.0" in text


async def test_sighup_forces_reload_in_process(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(DEFAULT_PROFILE_YAML)
    log, cap = capturing_logger()
    ctl = Controller(profile_path=str(path), reload_poll_seconds=3600, logger=log)
    started: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(ctl, "127.0.0.1", 0, started.set_result))
    addresses = await asyncio.wait_for(started, 10)
    url = f"http://127.0.0.1:{addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as s:
            path.write_text(RATIO_3)
            os.kill(os.getpid(), signal.SIGHUP)
            status = await _wait_version(s, url, "2")
            assert status["config"]["version"] == "2"
            path.write_text(BAD)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.2)
            assert (await _status(s, url))["config"]["version"] == "2"
            assert any(
                c.kwargs.get("trigger") == "sighup" and "reason" in c.kwargs for c in cap.calls
            )
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 10) == 0


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address("localhost:0") == ("localhost", 0)
    for bad in ("8080", "127.0.0.1", ":80", "::1:80", "[::1]", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"]) == 2
    assert main(["127.0.0.1:1", "--listen", "127.0.0.1:2"]) == 2
    assert main(["nonsense"]) == 2
    assert main(["--stale-after", "0"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert main(["--listen", "127.0.0.1:0", "--profile", str(bad)]) == 1
    assert "overrides.network.rtt_spike.ratio" in capsys.readouterr().err


def test_subprocess_serves_reloads_on_sighup_and_exits_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(DEFAULT_PROFILE_YAML)
    log = tmp_path / "controller.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tapio",
                "controller",
                "127.0.0.1:0",
                "--profile",
                str(path),
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        port = reported_port(log.read_text, lambda: proc.poll() is None)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    url = f"http://127.0.0.1:{port}"

    async def scenario() -> None:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with s.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "controller did not start"
                await asyncio.sleep(0.05)
            assert (await _status(s, url))["config"]["config_hash"] == PRODUCTION_DEFAULT_HASH
            path.write_text(RATIO_3)
            proc.send_signal(signal.SIGHUP)
            assert (await _wait_version(s, url, "2", within=10))["config"]["version"] == "2"

    try:
        asyncio.run(scenario())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    logs = [
        msgspec.json.decode(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")
    ]
    events = [entry["event"] for entry in logs]
    assert "controller listening" in events and "profile reloaded" in events
