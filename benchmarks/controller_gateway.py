"""Controller gateway benchmark: N simulated agents, real HTTP, forwarding into a real NATS.

Starts a nats-server with JetStream (temporary store) and ``python -m tapio controller
--forward nats://...`` on loopback, registers N agents (in-process, one aiohttp client pool),
then for a fixed duration a pool of concurrent workers cycles through the agents: each turn is
one heartbeat and, every ``--events-every`` turns, one batch of ``--batch`` refused-connect
occurrences. Reports heartbeats/s, occurrences/s acknowledged by JetStream (the stream's
message count, read at the end after the queue drained), request latency percentiles, and
whether every occurrence was stored exactly once. Usage::

    .venv/bin/python benchmarks/controller_gateway.py [--agents 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import msgspec
import nats

JSON = {"Content-Type": "application/json"}
V = "tapio-wire/v1"
HASH = "0" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def hello(agent: str) -> bytes:
    return msgspec.json.encode(
        {
            "wire_version": V,
            "agent_id": agent,
            "node_name": f"node-{agent}",
            "tapio_version": "0.1.0",
            "kernel_release": "6.18.0",
            "arch": "x86_64",
        }
    )


def heartbeat(agent: str) -> bytes:
    counters = dict.fromkeys(
        (
            "events_total",
            "malformed_events_total",
            "lost_events_total",
            "correlation_drops_total",
            "sink_drops_total",
            "controller_send_failures_total",
        ),
        0,
    )
    return msgspec.json.encode(
        {
            "wire_version": V,
            "agent_id": agent,
            "node_name": f"node-{agent}",
            "config_version": "1",
            "config_hash": HASH,
            "uptime_seconds": 5,
            "observers": {"network": "running"},
            "counters": counters,
            "degraded_reasons": [],
        }
    )


def events(agent: str, sequence: int, first_id: int, n: int) -> bytes:
    evs = [
        {
            "type": "kernel.network.connection_refused",
            "timestamp_unix_nanos": 1_700_000_000_000_000_000 + first_id + i,
            "observer": "network",
            "severity": "warning",
            "facts": {
                "occurrence_id": f"bench-{first_id + i:012d}",
                "dst_addr": "10.0.0.1",
                "dst_port": 443,
                "pid": 1234,
                "comm": "curl",
            },
        }
        for i in range(n)
    ]
    return msgspec.json.encode(
        {
            "wire_version": V,
            "agent_id": agent,
            "node_name": f"node-{agent}",
            "sequence": sequence,
            "sent_at_unix_nanos": 1_700_000_000_000_000_000,
            "events": evs,
        }
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


async def stream_count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("TAPIO_EVIDENCE")
        return int(info.state.messages)
    finally:
        await nc.close()


async def run(args: argparse.Namespace, base: str, nats_url: str) -> dict[str, float]:
    agents = [f"bench-{i:05d}" for i in range(args.agents)]
    conn = aiohttp.TCPConnector(limit=args.concurrency)
    hb_lat: list[float] = []
    ev_lat: list[float] = []
    sent_events = 0
    refused = 0
    async with aiohttp.ClientSession(connector=conn) as s:
        sem = asyncio.Semaphore(args.concurrency)

        async def register(agent: str) -> None:
            async with sem, s.post(base + "/v1/agents/hello", data=hello(agent), headers=JSON) as r:
                assert r.status == 200, await r.text()

        t0 = time.monotonic()
        await asyncio.gather(*(register(a) for a in agents))
        register_s = time.monotonic() - t0

        sequences = dict.fromkeys(agents, 0)
        ids = itertools.count()
        turn = itertools.count()
        deadline = time.monotonic() + args.seconds

        async def worker(offset: int) -> None:
            nonlocal sent_events, refused
            i = offset
            while time.monotonic() < deadline:
                agent = agents[i % len(agents)]
                i += args.concurrency
                t = time.monotonic()
                async with s.post(
                    base + "/v1/agents/heartbeat", data=heartbeat(agent), headers=JSON
                ) as r:
                    await r.read()
                    assert r.status == 200
                hb_lat.append(time.monotonic() - t)
                if next(turn) % args.events_every == 0:
                    sequences[agent] += 1
                    first = next(ids) * args.batch
                    body = events(agent, sequences[agent], first, args.batch)
                    t = time.monotonic()
                    async with s.post(base + "/v1/events", data=body, headers=JSON) as r:
                        await r.read()
                        if r.status == 200:
                            sent_events += args.batch
                        else:
                            assert r.status == 503
                            refused += args.batch
                    ev_lat.append(time.monotonic() - t)

        t1 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
        elapsed = time.monotonic() - t1
    # every accepted occurrence must end up in the stream, once
    deadline = time.monotonic() + 60
    stored = await stream_count(nats_url)
    while stored < sent_events and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        stored = await stream_count(nats_url)
    drained = time.monotonic() - t1
    return {
        "agents": args.agents,
        "register_s": register_s,
        "heartbeats_per_s": len(hb_lat) / elapsed,
        "hb_p50_ms": pct(hb_lat, 0.5),
        "hb_p99_ms": pct(hb_lat, 0.99),
        "occurrences_accepted": sent_events,
        "occurrences_refused_503": refused,
        "occurrences_stored": stored,
        "forwarded_per_s": stored / drained,
        "events_p50_ms": pct(ev_lat, 0.5),
        "events_p99_ms": pct(ev_lat, 0.99),
        "mean_hb_ms": statistics.fmean(hb_lat) * 1000 if hb_lat else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--events-every", type=int, default=5)
    args = p.parse_args()
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    store = Path(tempfile.mkdtemp(prefix="tapio-bench-js-"))
    nport, cport = free_port(), free_port()
    nats_proc = subprocess.Popen(
        [binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(nport)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctl = None
    try:
        wait_port(nport)
        nats_url = f"nats://127.0.0.1:{nport}"
        ctl = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tapio",
                "controller",
                f"127.0.0.1:{cport}",
                "--forward",
                nats_url,
                "--log-level",
                "warning",
                "--queue-max-events",
                "50000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(cport)
        base = f"http://127.0.0.1:{cport}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        result = asyncio.run(run(args, base, nats_url))
        for k, v in result.items():
            print(f"{k:24} {v:.1f}" if isinstance(v, float) else f"{k:24} {v}")
        ok = result["occurrences_stored"] == result["occurrences_accepted"]
        print("exactly once:", "yes" if ok else "NO")
        return 0 if ok else 1
    finally:
        if ctl is not None:
            ctl.send_signal(signal.SIGTERM)
            ctl.wait(30)
        nats_proc.terminate()
        nats_proc.wait(10)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
