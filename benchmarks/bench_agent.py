#!/usr/bin/env python3
"""Agent core benchmark: the default agent (every observer), every figure a ratio to a
baseline measured in the same run.

Prints, side by side in one run:
  1. ns per connect() to a closed port: no agent vs the agent running, in alternating short
     pairs with the workload and the agent on different CPUs (``pairs.py``: the median of the
     per-pair ratios and its spread, per-program bpf_stats; target <= 1.10x),
  2. for the stdout sink and for the file sink: the agent's CPU per occurrence over a burst of
     refused connects from one C loop, the floor (``floor.py``: the irreducible Python work for
     the same records), measured right after each burst, and the median of the per-round ratios
     (target <= 2.0x); every occurrence of the burst delivered
     with ``tapio_lost_events_total`` and ``tapio_sink_drops_total`` at 0,
  3. the idle agent's CPU and RSS over 30 s (targets < 0.3 % of a core, < 40 MiB),
  4. ``import tapio.agent.cli`` in a fresh interpreter (target <= 150 ms).

Needs root. The connect loop is C (compiled here with gcc) so Python's own socket overhead
does not dilute the ratio. Runs repeat and report medians; the machine may be shared, so run
it under ``flock /tmp/tapio-kernel.lock`` when other kernel work is going on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from floor import floor_us, sample_line
from pairs import CpuSet, HotPath, hot_path, pin, placements, run_ns

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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


def metrics(port: int) -> dict[str, float]:
    """The agent's /metrics as {'name{labels}': value} (comments dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if k.split("{")[0] == name and all(w in k for w in want))


Row = tuple[str, str, str, str]  # metric, value, target, ok


class Agent:
    """The default agent (every observer unless ``observers`` says otherwise)."""

    def __init__(
        self,
        tmp: Path,
        sink_out: str = "/dev/null",
        *,
        sink: str = "stdout",
        observers: tuple[str, ...] = (),
        extra_config: str = "",
        serve_metrics: bool = False,
        cpus: CpuSet = None,
        ebpf_dir: Path | None = None,
    ) -> None:
        self.tmp = tmp
        self.err = open(tmp / "agent.err", "wb")  # noqa: SIM115
        self.out = open(sink_out if sink == "stdout" else "/dev/null", "wb")  # noqa: SIM115
        self.port = closed_port()
        cfg = tmp / "tapio.toml"
        served = f"[metrics]\nenabled = true\nport = {self.port}\n" if serve_metrics else ""
        cfg.write_text(served + extra_config)
        argv = [sys.executable, "-m", "tapio", "agent", "--config", str(cfg), "--sink", sink]
        argv += ["--log-format", "json", "--data-dir", str(tmp / "data")]
        for name in observers:
            argv += ["--observer", name]
        if ebpf_dir is not None:
            argv += ["--ebpf-dir", str(ebpf_dir)]
        self.proc = subprocess.Popen(
            argv, stdout=self.out, stderr=self.err, cwd=tmp, preexec_fn=pin(cpus)
        )
        deadline = time.monotonic() + 30
        while b"agent started" not in (tmp / "agent.err").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"agent did not start:\n{(tmp / 'agent.err').read_text()}")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        return metrics(self.port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.err.close()
        self.out.close()


def connect_ns(exe: Path, port: int, n: int) -> float:
    out = subprocess.run([str(exe), str(port), str(n)], check=True, capture_output=True, text=True)
    return float(out.stdout)


@contextlib.contextmanager
def agent_running(tmp: Path, cpus: CpuSet = None, ebpf_dir: Path | None = None) -> Iterator[int]:
    """The default agent (stdout to /dev/null), pinned to ``cpus``, with the BPF objects of
    ``ebpf_dir`` (default: the packaged ones); yields its pid."""
    agent = Agent(tmp, cpus=cpus, ebpf_dir=ebpf_dir)
    try:
        yield agent.proc.pid
    finally:
        agent.stop()


def bench_connect(exe: Path, tmp: Path, n: int, pairs: int, where: list[str]) -> list[HotPath]:
    """connect() to a closed port, bare and with the default agent, in alternating pairs
    (``pairs.py``); prints each placement's table and returns the results."""
    port = closed_port()
    results = []
    for placement in placements(where):
        hp = hot_path(
            f"connect() to a closed loopback port, {n} per round",
            lambda cpus: run_ns([str(exe), str(port), str(n)], cpus),
            lambda cpus: agent_running(tmp, cpus),
            pairs=pairs,
            ops=n,
            target=1.10,
            placement=placement,
            settle=0.5,
            cpu_seconds=cpu_seconds,
        )
        print("\n".join(hp.lines), flush=True)
        results.append(hp)
    return results


class Written:
    """Connection-refused lines (stdout) or files (file sink) written so far.

    The stdout file is read from where the last call stopped: re-reading the whole file every
    50 ms (30 MB by the end of a 50,000 burst) took a good part of a CPU from the agent it was
    measuring, on a machine with two.
    """

    def __init__(self, sink: str, out_path: Path, data_dir: Path) -> None:
        self.sink, self.out_path, self.data_dir = sink, out_path, data_dir
        self.offset = self.count = 0

    def __call__(self) -> int:
        if self.sink == "stdout":
            with self.out_path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self.offset += end
            self.count += chunk.count(b"connection_refused", 0, end)
            return self.count
        try:
            return sum(1 for e in os.scandir(self.data_dir) if e.name.endswith(".json"))
        except FileNotFoundError:
            return 0


class Burst(NamedTuple):
    cpu_us: float  # agent CPU per delivered occurrence (idle rate subtracted)
    delivered: int
    lost: float  # tapio_lost_events_total
    dropped: float  # tapio_sink_drops_total
    sample: Path  # where a real line (or file) of this run is


def burst(exe: Path, tmp: Path, n: int, sink: str) -> Burst:
    """``n`` refused connects from one C loop against the default agent with ``sink``."""
    port = closed_port()
    out_path = tmp / "occurrences.jsonl"
    shutil.rmtree(tmp / "data", ignore_errors=True)
    # The file sink keeps every file of the burst so the sample and the count are all there.
    extra = f"[file]\nmax_files = {2 * n}\n" if sink == "file" else ""
    agent = Agent(tmp, str(out_path), sink=sink, extra_config=extra, serve_metrics=True)
    try:
        time.sleep(1.0)
        idle0 = cpu_seconds(agent.proc.pid)
        time.sleep(2.0)
        idle_rate = (cpu_seconds(agent.proc.pid) - idle0) / 2.0
        m0 = agent.metrics()
        ok0 = total(m0, "tapio_sink_writes_total", sink=sink, result="ok")
        c0 = cpu_seconds(agent.proc.pid)
        t0 = time.monotonic()
        connect_ns(exe, port, n)
        # Wait by counting what the sink wrote, never by scraping /metrics: a scrape costs
        # the agent milliseconds of CPU, which would be charged to the occurrences.
        # A count that stops growing for 3 s means some occurrences will never arrive.
        last, last_change = -1, time.monotonic()
        written = Written(sink, out_path, tmp / "data")
        while (count := written()) < n:
            if count != last:
                last, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > 3.0:
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        used = cpu_seconds(agent.proc.pid) - c0 - idle_rate * elapsed
        m = agent.metrics()
        delivered = int(total(m, "tapio_sink_writes_total", sink=sink, result="ok") - ok0)
        time.sleep(6.0)  # one kernel-metrics interval: lost events reach /metrics
        m = agent.metrics()
        lost = total(m, "tapio_lost_events_total")
        if lost:  # which ring overflowed (other work on a shared machine feeds them all)
            by_observer = {
                name: total(m, "tapio_lost_events_total", observer=name)
                for name in ("network", "container", "storage")
            }
            print(f"{sink}: lost events by observer {by_observer}", flush=True)
        dropped = total(m, "tapio_sink_drops_total")
    finally:
        agent.stop()
    sample = out_path if sink == "stdout" else tmp / "data"
    return Burst(used / max(delivered, 1) * 1e6, delivered, lost, dropped, sample)


def rss_breakdown(pid: int) -> str:
    """Where the RSS is: anonymous vs file-backed, and the largest mappings (MiB)."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kib = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in rollup.splitlines()[1:])}
    sizes: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            name = head[5] if len(head) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            sizes[name] = sizes.get(name, 0) + int(head[1])
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:6]
    parts = ", ".join(f"{Path(n).name or n} {v / 1024:.1f}" for n, v in top)
    return (
        f"anon {kib.get('Anonymous', 0) / 1024:.1f}, file+shared "
        f"{(kib.get('Rss', 0) - kib.get('Anonymous', 0)) / 1024:.1f}; largest: {parts}"
    )


def run_count(pid: int) -> int:
    """Times the kernel put any of the process's threads on a CPU (schedstat's third field)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[2])
    return total


def bench_idle(tmp: Path, secs: float) -> tuple[float, float]:
    out_path = tmp / "idle.jsonl"
    agent = Agent(tmp, str(out_path))
    try:
        time.sleep(2.0)
        c0, n0, w0 = cpu_seconds(agent.proc.pid), out_path.stat().st_size, run_count(agent.proc.pid)
        t0 = time.monotonic()
        time.sleep(secs)
        took = time.monotonic() - t0
        pct = (cpu_seconds(agent.proc.pid) - c0) / took * 100
        wakeups = (run_count(agent.proc.pid) - w0) / took
        rss = rss_mib(agent.proc.pid)
        with out_path.open("rb") as f:
            f.seek(n0)
            seen = f.read().count(b"\n")
        # On a shared machine "idle" is not silence: other work's refused connects and exits
        # are real occurrences, each one a wakeup and a line.
        print(
            f"idle: {wakeups:.1f} wakeups/s, {seen} occurrences from other work on the machine;"
            f" RSS {rss:.1f} MiB = {rss_breakdown(agent.proc.pid)}",
            flush=True,
        )
    finally:
        agent.stop()
    return pct, rss


def import_ms(module: str, repeat: int = 5) -> float:
    """Median wall time of ``import <module>`` in a fresh interpreter."""
    code = f"import time; t=time.perf_counter(); import {module}; print(time.perf_counter()-t)"
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        runs.append(float(out.stdout) * 1000)
    return statistics.median(runs)


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def sink_rows(exe: Path, tmp: Path, sink: str, n: int, rounds: int) -> list[Row]:
    """``rounds`` bursts of ``n`` occurrences into ``sink``, each followed by its floor."""
    # Each burst is followed at once by its floor, so a drift of the host between
    # rounds moves both halves of a round's ratio; the median of those ratios is the
    # figure (the file sink's floor moved by 2.5x within one run on a busy host).
    runs, floors = [], []
    for _ in range(rounds):
        runs.append(burst(exe, tmp, n, sink))
        floors.append(floor_us(sink, n, sample_line(runs[-1].sample), tmp))
    per_occ = statistics.median(r.cpu_us for r in runs)
    fl = statistics.median(floors)
    ratio = statistics.median(r.cpu_us / f for r, f in zip(runs, floors, strict=True))
    rows = [
        (f"{sink}: agent CPU per occurrence (us)", f"{per_occ:.2f}", "", ""),
        (f"{sink}: floor per occurrence (us)", f"{fl:.2f}", "", ""),
        (
            f"{sink}:   ratio agent / floor (median of rounds)",
            f"{ratio:.2f}x",
            "<= 2.0x",
            yes(ratio <= 2.0),
        ),
        (
            f"{sink}: burst of {n} delivered (min)",
            str(min(r.delivered for r in runs)),
            str(n),
            yes(min(r.delivered for r in runs) >= n),
        ),
        (
            f"{sink}: lost events / sink drops (max)",
            f"{max(r.lost for r in runs):.0f} / {max(r.dropped for r in runs):.0f}",
            "0 / 0",
            yes(max(r.lost + r.dropped for r in runs) == 0),
        ),
    ]
    print(
        f"{sink}: per round cpu_us={[round(r.cpu_us, 2) for r in runs]} "
        f"floor_us={[round(f, 2) for f in floors]} "
        f"delivered={[r.delivered for r in runs]}",
        flush=True,
    )
    return rows


@contextlib.contextmanager
def private_tmpfs(path: Path) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the duration (root only), unmounted even on failure."""
    path.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0700", "tapio-bench", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connects", type=int, default=20_000, help="per connect round")
    parser.add_argument(
        "--pairs",
        type=int,
        default=21,
        help="bare/agent pairs (connect); fewer make a noisy median",
    )
    parser.add_argument(
        "--placement", action="append", help="connect: split (default) and/or free (pairs.py)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--occurrences", type=int, default=50_000)
    parser.add_argument("--file-occurrences", type=int, default=10_000)
    parser.add_argument("--idle-secs", type=float, default=30.0)
    parser.add_argument("--skip", action="append", default=[], help="connect, stdout, file, idle")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_agent: run as root")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build_connect_loop(tmp)
        if "connect" not in args.skip:
            where = args.placement or ["split"]
            for hp in bench_connect(exe, tmp, args.connects, args.pairs, where):
                name = f"connect() closed port, {hp.placement}"
                rows += [
                    (f"{name}: no agent (ns)", f"{hp.bare:.0f}", "", ""),
                    (f"{name}: agent (ns)", f"{hp.agent:.0f}", "", ""),
                    (
                        "  median of the per-pair ratios",
                        f"{hp.ratio:.3f}x",
                        "<= 1.10x",
                        yes(hp.ratio <= 1.10),
                    ),
                ]
        for sink, n in (("stdout", args.occurrences), ("file", args.file_occurrences)):
            if sink in args.skip:
                continue
            # The file sink's bursts and floors write to a tmpfs of their own: on the root
            # filesystem a round after another round's 10,000 deletions cost both halves up to
            # 9x the CPU per file of the first round (the journal's state, not Tapio).
            fs = private_tmpfs(tmp / "fs") if sink == "file" else contextlib.nullcontext(tmp)
            with fs as where:
                rows += sink_rows(exe, where, sink, n, args.rounds)
        if "idle" not in args.skip:
            idle_pct, idle_rss = bench_idle(tmp, args.idle_secs)
            rows += [
                (
                    f"idle agent CPU over {args.idle_secs:.0f} s (% of a core)",
                    f"{idle_pct:.3f}",
                    "< 0.3 %",
                    yes(idle_pct < 0.3),
                ),
                ("idle agent RSS (MiB)", f"{idle_rss:.1f}", "< 40 MiB", yes(idle_rss < 40)),
            ]
        base = import_ms("json")
        imp = import_ms("tapio.agent.cli")
        rows += [
            ("import json, same-run baseline (ms, median of 5)", f"{base:.1f}", "", ""),
            ("import tapio.agent.cli (ms, median of 5)", f"{imp:.1f}", "<= 150", yes(imp <= 150)),
            ("  ratio to import json", f"{imp / base:.1f}x", "", ""),
        ]
    print("agent core: default agent (every observer)")
    print(f"{'metric':50} {'value':>14} {'target':>12}  ok")
    for name, value, target, ok in rows:
        print(f"{name:50} {value:>14} {target:>12}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
