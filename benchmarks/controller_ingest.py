"""Controller ingest benchmark: N simulated agents POSTing event batches over loopback.

Starts ``python -m tapio controller`` as a subprocess on 127.0.0.1 (a free port), registers
each agent, then every agent posts batches back to back (one request in flight per agent, as
the real controller sink does) for a fixed duration. Prints accepted events/s and per-batch
latency percentiles. Usage::

    .venv/bin/python benchmarks/controller_ingest.py [--agents 8] [--batch 256] [--seconds 10]
        [--python OTHER_TREE/.venv/bin/python]

``--python`` runs the controller with another interpreter (e.g. another checkout's venv, whose
editable install points at that checkout's source) while this same client drives it, so two
trees are compared with identical traffic. ``--pairs N`` (with ``--python``) alternates the two:
N rounds of the other tree's controller, then this tree's, each printed, then the totals and
their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import msgspec

JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_batch(agent: str, sequence: int, size: int) -> bytes:
    # Events as an agent's controller sink sends them: the occurrence's data plus its id,
    # outcome and error (the controller keys its records by that id).
    events = [
        {
            "type": "kernel.network.connection_refused",
            "timestamp_unix_nanos": 1_700_000_000_000_000_000 + sequence * size + i,
            "observer": "network",
            "severity": "warning",
            "facts": {
                "comm": "curl",
                "dst_addr": "10.0.0.1",
                "dst_port": 443,
                "error_code": "RST_RECEIVED",
                "error_message": "TCP RST 10.0.0.2:40000 → 10.0.0.1:443",
                "occurrence_id": f"01BENCH{agent[-6:]:0>6}{sequence:08d}{i:05d}"[:26],
                "outcome": "failure",
                "pid": 1234,
            },
        }
        for i in range(size)
    ]
    body = {
        "wire_version": "tapio-wire/v1",
        "agent_id": agent,
        "node_name": f"node-{agent}",
        "sequence": sequence,
        "sent_at_unix_nanos": time.time_ns(),
        "events": events,
    }
    return msgspec.json.encode(body)


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("controller did not become ready")


async def agent_loop(
    session: aiohttp.ClientSession, url: str, agent: str, size: int, stop_at: float
) -> tuple[int, list[float], int]:
    hello = {
        "wire_version": "tapio-wire/v1",
        "agent_id": agent,
        "node_name": f"node-{agent}",
        "tapio_version": "0.1.0",
        "kernel_release": "bench",
        "arch": "x86_64",
    }
    async with session.post(
        url + "/v1/agents/hello", data=msgspec.json.encode(hello), headers=JSON
    ) as r:
        r.raise_for_status()
    accepted, failures, latencies, seq = 0, 0, [], 0
    while time.monotonic() < stop_at:
        seq += 1
        body = make_batch(agent, seq, size)
        t0 = time.perf_counter()
        async with session.post(url + "/v1/events", data=body, headers=JSON) as r:
            raw = await r.read()
        latencies.append(time.perf_counter() - t0)
        if r.status == 200:
            accepted += msgspec.json.decode(raw)["accepted"]
        else:
            failures += 1
    return accepted, latencies, failures


async def run(url: str, agents: int, size: int, seconds: float) -> float:
    connector = aiohttp.TCPConnector(limit=agents)
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(session, url)
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                agent_loop(session, url, f"bench-{i}", size, started + seconds)
                for i in range(agents)
            )
        )
        elapsed = time.monotonic() - started
        async with session.get(url + "/v1/status") as r:
            status = msgspec.json.decode(await r.read())
    accepted = sum(r[0] for r in results)
    latencies = sorted(x for r in results for x in r[1])
    failures = sum(r[2] for r in results)
    q = statistics.quantiles(latencies, n=100)
    total = status["totals"]["accepted_events_total"]
    print(f"agents={agents} batch={size} duration={elapsed:.1f}s", end=" ")
    print(f"batches={len(latencies)} failures={failures}")
    print(f"accepted events/s: {accepted / elapsed:,.0f} (controller total {total:,})")
    p50, p99, worst = q[49] * 1000, q[98] * 1000, latencies[-1] * 1000
    print(f"batch latency: p50={p50:.2f} ms p99={p99:.2f} ms max={worst:.2f} ms")
    return accepted / elapsed


def one_round(python: str, agents: int, size: int, seconds: float) -> float:
    """Start a controller with ``python``, drive it for ``seconds``, stop it; events/s."""
    port = free_port()
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "tapio",
            "controller",
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ],
        env=dict(os.environ),
    )
    try:
        return asyncio.run(run(f"http://127.0.0.1:{port}", agents, size, seconds))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter that runs the controller"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="alternate N rounds of --python's controller with this tree's (same client)",
    )
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.pairs < 1:
        one_round(args.python, args.agents, args.batch, args.seconds)
        return 0
    other, this = [], []
    for pair in range(1, args.pairs + 1):
        for label, python, out in (("other", args.python, other), ("this", sys.executable, this)):
            print(f"-- pair {pair}, {label} tree ({python})")
            out.append(one_round(python, args.agents, args.batch, args.seconds))
    print("pair  other events/s  this events/s  this/other")
    for pair, (o, t) in enumerate(zip(other, this, strict=True), 1):
        print(f"{pair:>4}  {o:>14,.0f}  {t:>13,.0f}  {t / o:>10.2f}")
    print(f"total {sum(other):>14,.0f}  {sum(this):>13,.0f}  {sum(this) / sum(other):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
