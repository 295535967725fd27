#!/usr/bin/env python3
"""Agent core benchmark (issue: agent core and network observer).

Prints, side by side in one run:
  1. ns per connect() to a closed port: no agent vs the agent running (target <= 1.15x),
  2. the agent's CPU per occurrence from ring buffer to stdout JSON line (target <= 3 us),
  3. the idle agent's CPU and RSS over 30 s (targets < 0.5 % of a core, < 60 MiB).

Needs root. The connect loop is C (compiled here with gcc) so Python's own socket overhead
does not dilute the ratio. Runs alternate bare/agent several times and report medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def build_connect_loop(tmp: Path) -> Path:
    exe = tmp / "connect_loop"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("bench_agent: needs gcc")
    subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "connect_loop.c")], check=True)
    return exe


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Agent:
    def __init__(self, tmp: Path, sink_out: str = "/dev/null") -> None:
        self.tmp = tmp
        self.err = open(tmp / "agent.err", "wb")  # noqa: SIM115
        self.out = open(sink_out, "wb")  # noqa: SIM115
        cfg = tmp / "tapio.toml"
        cfg.write_text("")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tapio",
                "agent",
                "--config",
                str(cfg),
                "--sink",
                "stdout",
                "--observer",
                "network",
                "--log-format",
                "json",
            ],
            stdout=self.out,
            stderr=self.err,
            cwd=tmp,
        )
        deadline = time.monotonic() + 20
        while b"agent started" not in (tmp / "agent.err").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"agent did not start:\n{(tmp / 'agent.err').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.err.close()
        self.out.close()


def connect_ns(exe: Path, port: int, n: int) -> float:
    out = subprocess.run([str(exe), str(port), str(n)], check=True, capture_output=True, text=True)
    return float(out.stdout)


def bench_connect(exe: Path, tmp: Path, n: int, rounds: int) -> tuple[float, float]:
    port = closed_port()
    connect_ns(exe, port, 2000)  # warm up
    bare, with_agent = [], []
    for _ in range(rounds):
        bare.append(connect_ns(exe, port, n))
        agent = Agent(tmp)
        try:
            time.sleep(0.5)
            with_agent.append(connect_ns(exe, port, n))
            time.sleep(0.3)
        finally:
            agent.stop()
    return statistics.median(bare), statistics.median(with_agent)


def bench_per_occurrence(exe: Path, tmp: Path, n: int) -> tuple[float, int]:
    port = closed_port()
    out_path = tmp / "occurrences.jsonl"
    agent = Agent(tmp, str(out_path))
    try:
        time.sleep(1.0)
        idle0 = cpu_seconds(agent.proc.pid)
        time.sleep(2.0)
        idle_rate = (cpu_seconds(agent.proc.pid) - idle0) / 2.0
        c0 = cpu_seconds(agent.proc.pid)
        t0 = time.monotonic()
        connect_ns(exe, port, n)
        # wait until every occurrence is out
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = out_path.read_bytes().count(b"\n")
            if lines >= n:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        used = cpu_seconds(agent.proc.pid) - c0 - idle_rate * elapsed
        lines = out_path.read_bytes().count(b"\n")
    finally:
        agent.stop()
    return used / max(lines, 1) * 1e6, lines


def bench_idle(tmp: Path, secs: float) -> tuple[float, float]:
    agent = Agent(tmp)
    try:
        time.sleep(2.0)
        c0 = cpu_seconds(agent.proc.pid)
        t0 = time.monotonic()
        time.sleep(secs)
        pct = (cpu_seconds(agent.proc.pid) - c0) / (time.monotonic() - t0) * 100
        rss = rss_mib(agent.proc.pid)
    finally:
        agent.stop()
    return pct, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connects", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--occurrences", type=int, default=50_000)
    parser.add_argument("--idle-secs", type=float, default=30.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_agent: run as root")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build_connect_loop(tmp)
        bare, agent = bench_connect(exe, tmp, args.connects, args.rounds)
        runs = [bench_per_occurrence(exe, tmp, args.occurrences) for _ in range(args.rounds)]
        per_occ = statistics.median(r[0] for r in runs)
        lines = min(r[1] for r in runs)
        print(f"occurrences written per round (min): {lines}")
        idle_pct, idle_rss = bench_idle(tmp, args.idle_secs)
    ratio = agent / bare
    print("agent core / network observer")
    print(f"{'metric':44} {'value':>14} {'target':>12}  ok")
    rows = [
        ("connect() closed port, no agent (ns)", f"{bare:.0f}", "", ""),
        ("connect() closed port, agent running (ns)", f"{agent:.0f}", "", ""),
        ("  ratio", f"{ratio:.3f}x", "<= 1.15x", "yes" if ratio <= 1.15 else "NO"),
        (
            f"agent CPU per occurrence (median of {args.rounds}, us)",
            f"{per_occ:.2f}",
            "<= 3 us",
            "yes" if per_occ <= 3 else "NO",
        ),
        (
            f"idle agent CPU over {args.idle_secs:.0f} s (% of a core)",
            f"{idle_pct:.3f}",
            "< 0.5 %",
            "yes" if idle_pct < 0.5 else "NO",
        ),
        ("idle agent RSS (MiB)", f"{idle_rss:.1f}", "< 60 MiB", "yes" if idle_rss < 60 else "NO"),
    ]
    for name, value, target, ok in rows:
        print(f"{name:44} {value:>14} {target:>12}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
