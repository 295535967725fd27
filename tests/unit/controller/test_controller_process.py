"""``python -m tapio controller`` as a real process: https with --tls-cert/--tls-key, the agent
token from the environment, forwarding configured in --config (file://) plus --forward, SIGTERM
drain, and no token anywhere in its log output."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import trustme

from tapio.controller.cli import main

from ...ports import reported_port
from .ctl_harness import JSON, batch, enc, event, hello

TOKEN = "proc-token-abcdefghijklmnop0123456789"


def _events(n: int) -> list[dict[str, Any]]:
    return [
        event(facts={"occurrence_id": f"occ-{i}", "dst_port": 1000 + i, "pid": 7}) for i in range(n)
    ]


def test_https_token_config_file_forward_and_sigterm_drain(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_pem, key_pem, ca_pem = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    config = tmp_path / "controller.yaml"
    config.write_text(f"forward:\n  - file://{out_a}\ndrain_grace: 10\nqueue_max_events: 500\n")
    env = {**os.environ, "TAPIO_AGENT_TOKEN_FILE": str(token)}
    out_log, err_log = tmp_path / "controller.stdout", tmp_path / "controller.stderr"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tapio", "controller", "127.0.0.1:0"),
                *("--config", str(config), "--forward", f"file://{out_b}"),
                *("--tls-cert", str(cert_pem), "--tls-key", str(key_pem), "--log-level", "debug"),
            ],
            stdout=out,
            stderr=err,
            env=env,
        )
    try:
        port = reported_port(err_log.read_text, lambda: proc.poll() is None)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    auth = {**JSON, "Authorization": f"Bearer {TOKEN}"}

    async def scenario() -> None:
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as s:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "controller did not become ready"
                await asyncio.sleep(0.05)
            async with s.post(url + "/v1/agents/hello", data=enc(hello()), headers=JSON) as r:
                assert r.status == 401
            bad = {**JSON, "Authorization": "Bearer nope"}
            async with s.post(url + "/v1/agents/hello", data=enc(hello()), headers=bad) as r:
                assert r.status == 401
            async with s.post(url + "/v1/agents/hello", data=enc(hello()), headers=auth) as r:
                assert r.status == 200
            for k in range(4):
                body = batch(sequence=k + 1, events=_events(50)[k * 10 : k * 10 + 10])
                async with s.post(url + "/v1/events", data=enc(body), headers=auth) as r:
                    assert r.status == 200
            async with s.get(url + "/metrics") as r:
                assert r.status == 200
                assert TOKEN not in await r.text()
        # plain http to the https port is not served
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    await r.read()

    try:
        asyncio.run(scenario())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    logs = out_log.read_bytes() + err_log.read_bytes()
    assert b"controller listening" in logs
    assert TOKEN.encode() not in logs
    for directory in (out_a, out_b):
        lines = (directory / "evidence.jsonl").read_bytes().splitlines()
        docs = [msgspec.json.decode(line) for line in lines]
        assert sorted(d["id"] for d in docs) == sorted(f"occ-{i}" for i in range(40))
        assert all(d["data"]["pid"] == 7 and d["node_name"] == "node-a" for d in docs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "/nonexistent"], "--tls-cert and --tls-key go together"),
        (["--forward", "kafka://x:1"], "unsupported --forward scheme kafka://"),
        (["--forward", "nats://user:hunter2@"], "not a nats://HOST:PORT URL"),
        (["--queue-max-events", "100"], "--queue-max-events must be at least 256"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["127.0.0.1:0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "hunter2" not in err


def test_unusable_token_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t").write_text("")
    assert main(["127.0.0.1:0", "--agent-token-file", str(tmp_path / "t")]) == 1
    assert "is empty" in capsys.readouterr().err


def test_bad_config_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.yaml").write_text("forwad: [file:///tmp]\n")
    assert main(["127.0.0.1:0", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown setting 'forwad'" in capsys.readouterr().err
