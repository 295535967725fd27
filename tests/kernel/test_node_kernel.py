"""Node observer end to end: the real agent, real cgroups, real pressure.

* page-cache thrash in a memory-limited cgroup → ONE ``memory_pressure`` naming the cgroup;
* a busy loop under a 10 % CPU quota → ONE ``cpu_stall`` with ``signal: throttling``;
* 8 busy processes pinned to CPU 0 → ONE ``cpu_stall`` with ``signal: runq_latency``;
* no hardware PMU here → ``tapio_observer_capability{observer="node",capability="pmu"} 0``, one
  log line, no ``ipc_degradation``, and the rest still works; no ``memory_pressure`` at all
  while only CPU load runs (30 s and more: the idle check shares that window).

Both cgroup layouts run: on pure cgroup v2 (the kernel matrix's guests, Kubernetes nodes) one
cgroup2 directory holds the limit (``memory.max``/``cpu.max``, the controller delegated through
``cgroup.subtree_control``) and the PSI files; on the hybrid development VM the memory limit and
the CPU quota are v1 controllers and PSI lives in a controller-less cgroup2 directory, and test
processes are put in both. Everything created is removed even when an assertion fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from .cgroups import (
    Layout,
    cgroup_dirs,
    layout,
    memory_events,
    missing,
    set_cpu_quota,
    set_memory_limit,
)
from .harness import AgentProcess, agent, require_kernel, wait_until

pytestmark = pytest.mark.kernel

CG = Path("/sys/fs/cgroup")
# On a block-backed file system (a tmpfs would keep the pages unreclaimable); the kernel matrix
# points this at the guest's scratch disk.
THRASH_FILE = Path(os.environ.get("TAPIO_TEST_SCRATCH", "/var/tmp")) / "tapio-node-thrash.bin"
THRASH_FILE_MIB = 256
THRASH_REGION_MIB = 64  # re-read region: 1.33x the limit keeps refaults in the workingset
MEMORY_LIMIT_MIB = 48

# 8 threads of random 4 KiB preads (released GIL) over a region larger than the memcg limit:
# every miss charges a page (direct reclaim) and refaults of workingset pages stall in I/O. The
# cache of the whole file is dropped first so the pages are charged to this cgroup.
THRASH = r"""
import os, random, sys, threading, time
path, secs, mib = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + secs
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
pages = (mib << 20) // 4096
def worker():
    r = random.Random()
    while time.monotonic() < end:
        for _ in range(64):
            os.pread(fd, 4096, r.randrange(pages) * 4096)
ts = [threading.Thread(target=worker) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
"""
BUSY = "while True: pass"


def _require_psi_and(*roles: str) -> Layout:
    """The host's cgroup layout; skip (fail in CI) without PSI or a hierarchy for ``roles``."""
    require_kernel(("node",))
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("kernel without PSI (Debian kernels need psi=1 on the command line)")
    if missing(roles):
        pytest.skip(f"no cgroup hierarchy for {', '.join(missing(roles))}")
    return layout()


def _kill_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def spawn(
    argv: Sequence[str], dirs: Sequence[Path] = (), cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` already inside ``dirs`` (and pinned to ``cpus``) before it execs."""

    def enter() -> None:
        for d in dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(
        list(argv), preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def node_occurrences(a: Any, type_: str, **facts: object) -> list[dict[str, Any]]:
    out = []
    for occ in a.occurrences(type_):
        data = occ.get("data") or {}
        if all(data.get(k) == v for k, v in facts.items()):
            out.append(occ)
    return out


def wait_for_quiet_memory(limit: float = 1.0, timeout: float = 60.0) -> None:
    """Node memory PSI avg10 under ``limit`` % (a previous test's pressure decays over ~10 s)."""

    def quiet() -> bool:
        line = Path("/proc/pressure/memory").read_text().splitlines()[0]
        return float(line.split()[1].partition("=")[2]) < limit

    if not wait_until(quiet, timeout, interval=0.5):
        pytest.skip(f"node memory pressure did not settle under {limit}% within {timeout}s")


def brief(occs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    keys = ("signal", "cgroup", "some_avg10", "full_avg10", "max_wait_ms", "worst_pid")
    return [
        (o["timestamp"], o["error"]["message"], {k: o["data"].get(k) for k in keys}) for o in occs
    ]


def _thrash_file() -> Path:
    if THRASH_FILE.exists() and THRASH_FILE.stat().st_size == THRASH_FILE_MIB << 20:
        return THRASH_FILE
    chunk = os.urandom(1 << 20)
    with open(THRASH_FILE, "wb") as fh:
        for _ in range(THRASH_FILE_MIB):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return THRASH_FILE


def test_memory_pressure_from_page_cache_thrash(tmp_path: Path) -> None:
    _require_psi_and("memory", "unified")
    path = _thrash_file()
    name = f"tapio-node-mem-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with cgroup_dirs(("memory", "unified"), name, ("memory",)) as dirs:
            set_memory_limit(dirs["memory"], MEMORY_LIMIT_MIB << 20)
            # The cgroup exists before the agent starts, so the first discovery pass sees it.
            with agent(tmp_path, observers=("node",)) as a:
                start = time.monotonic()
                procs.append(
                    spawn(
                        [sys.executable, "-c", THRASH, str(path), "40", str(THRASH_REGION_MIB)],
                        list(dict.fromkeys(dirs.values())),
                    )
                )
                first = wait_until(
                    lambda: node_occurrences(a, "kernel.node.memory_pressure", cgroup=f"/{name}"),
                    timeout=30,
                    interval=0.5,
                )
                assert first, (
                    f"no memory_pressure for /{name} within 30 s; cgroup PSI now: "
                    f"{(dirs['unified'] / 'memory.pressure').read_text()!r}\n"
                    f"{a.stderr()[-3000:]}"
                )
                latency = time.monotonic() - start
                time.sleep(8)  # the thrash goes on: still exactly one occurrence
                assert procs[0].poll() is None, "thrasher died (OOM?)"
                mine = node_occurrences(a, "kernel.node.memory_pressure", cgroup=f"/{name}")
                everything = a.occurrences("kernel.node.memory_pressure")
                events = memory_events(dirs["memory"])
        assert len(mine) == 1, brief(mine)
        # The node shows the same pressure (node some >= cgroup some) but is folded into the
        # cgroup's occurrence rather than reported as a second incident.
        assert len(everything) == 1, brief(everything)
        occ = mine[0]
        data = occ["data"]
        assert occ["severity"] == "warning" and occ["outcome"] == "in_progress"
        assert occ["error"]["code"] == "MEMORY_PRESSURE"
        assert f"/{name}" in occ["error"]["message"]
        assert data["scope"] == "cgroup" and data["resource"] == "memory"
        assert data["some_avg10"] >= 10.0 or data["full_avg10"] >= 5.0, data
        assert data["some_total_us"] > 0 and "some_avg60" in data and "full_avg60" in data
        assert events["limit_hits"] > 0 and events["oom_kill"] == 0, events
        print(f"memory_pressure after {latency:.1f}s: {data}")
    finally:
        _kill_all(procs)


def _runq_open(a: AgentProcess) -> bool:
    """Whether the agent's run-queue latency condition is open: it started (one occurrence)
    more often than it cleared (one log line)."""
    started = len(node_occurrences(a, "kernel.node.cpu_stall", signal="runq_latency"))
    cleared = sum(1 for e in a.logs() if e.get("event") == "run-queue latency cleared")
    return started > cleared


def test_cpu_stall_throttling_runq_latency_and_no_pmu(tmp_path: Path) -> None:
    lay = _require_psi_and("cpu", "unified")
    port = 0  # the metrics server binds a free port itself and logs it
    config = (
        "[thresholds]\n"
        "runq_latency_ms = 10\n"
        "throttle_pct = 20.0\n"
        "[metrics]\n"
        f"enabled = true\nport = {port}\n"
    )
    name = f"tapio-node-cpu-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with cgroup_dirs(("cpu", "unified"), name, ("cpu",)) as dirs:
            set_cpu_quota(dirs["cpu"], 10000, 100000)
            wait_for_quiet_memory()
            with agent(tmp_path, observers=("node",), config=config) as a:
                window_start = time.monotonic()
                # -- throttling: a busy loop under a 10 % quota ----------------------------
                busy = spawn([sys.executable, "-c", BUSY], list(dict.fromkeys(dirs.values())))
                procs.append(busy)
                throttled = wait_until(
                    lambda: node_occurrences(
                        a, "kernel.node.cpu_stall", signal="throttling", cgroup=f"/{name}"
                    ),
                    timeout=20,
                    interval=0.5,
                )
                assert throttled, f"no throttling cpu_stall for /{name}\n{a.stderr()[-3000:]}"
                time.sleep(6)  # throttled the whole time: still one
                throttling = node_occurrences(
                    a, "kernel.node.cpu_stall", signal="throttling", cgroup=f"/{name}"
                )
                runq_during_throttle = node_occurrences(
                    a, "kernel.node.cpu_stall", signal="runq_latency"
                )
                _kill_all([busy])
                time.sleep(3)  # let any condition clear
                # A loaded machine may already have a run-queue latency condition open (waits
                # caused by other work): the agent reports a condition once, when it starts, so
                # the burst below must begin from a cleared one to be seen as a new start.
                assert wait_until(lambda: not _runq_open(a), timeout=30, interval=0.5), (
                    "run-queue latency never cleared before the burst (machine too loaded)\n"
                    + a.stderr()[-3000:]
                )

                # -- run-queue latency: 4x more busy processes than CPUs, all on CPU 0 --------
                before = {o["id"] for o in node_occurrences(a, "kernel.node.cpu_stall")}
                for _ in range(8):
                    procs.append(spawn([sys.executable, "-c", BUSY], cpus={0}))

                def new_runq() -> list[dict[str, Any]]:
                    return [
                        o
                        for o in node_occurrences(a, "kernel.node.cpu_stall", signal="runq_latency")
                        if o["id"] not in before
                    ]

                assert wait_until(new_runq, timeout=15, interval=0.5), a.stderr()[-3000:]
                time.sleep(6)  # the overload goes on: still one
                runq = new_runq()
                _kill_all(procs)
                # The idle check shares this window: CPU load only, never memory pressure.
                remaining = 30 - (time.monotonic() - window_start)
                if remaining > 0:
                    time.sleep(remaining)
                memory = a.occurrences("kernel.node.memory_pressure")
                ipc = a.occurrences("kernel.node.ipc_degradation")
                metrics = a.metrics_text(port)
                logs = a.logs()
                window = time.monotonic() - window_start

        assert len(throttling) == 1, brief(throttling)
        t = throttling[0]["data"]
        assert throttling[0]["error"]["code"] == "CPU_STALL"
        assert t["cgroup_hierarchy"] == ("v2" if lay.v2 else "v1") and t["quota_us"] == 10000
        assert t["throttled_pct"] >= 20.0 and t["nr_throttled_delta"] > 0, t
        # Quota waits are throttling, not run-queue latency: the busy loop never shows up as
        # the worst run-queue wait while it is only being throttled. A kernel without
        # task-local storage (5.10) cannot tell them apart; the agent must then say so, like
        # the missing PMU.
        split_off = (
            'tapio_observer_capability{capability="runq_throttle_split",observer="node"} 0.0'
            in metrics
        )
        if split_off:
            split_lines = [e for e in logs if e.get("capability") == "runq_throttle_split"]
            assert len(split_lines) == 1, split_lines
        else:
            assert all(o["data"].get("worst_pid") != busy.pid for o in runq_during_throttle)

        assert len(runq) == 1, brief(runq)
        r = runq[0]["data"]
        assert r["max_wait_ms"] >= 10.0 and r["waits_over_threshold"] >= 3, r
        assert r["threshold_ms"] == 10.0 and r["scope"] == "node"

        assert window >= 30
        assert memory == [], brief(memory)
        assert ipc == []
        line = 'tapio_observer_capability{capability="pmu",observer="node"} 0.0'
        assert line in metrics, [m for m in metrics.splitlines() if "capability" in m]
        assert 'tapio_observer_up{observer="node"} 1.0' in metrics
        pmu_lines = [
            e for e in logs if e.get("capability") == "pmu" or "PMU" in str(e.get("detail", ""))
        ]
        assert len(pmu_lines) == 1, pmu_lines
        assert "ipc_degradation" in pmu_lines[0]["detail"]
        print(f"throttling: {t}\nrunq: {r}")
    finally:
        _kill_all(procs)
