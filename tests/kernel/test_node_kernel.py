"""Node observer end to end: the real agent, real cgroups, real pressure.

* memory pressure in a limited cgroup (anonymous memory above ``memory.high`` on cgroup v2,
  page-cache thrash under a v1 limit on a hybrid host) → ONE ``memory_pressure`` naming it;
* a busy loop under a 10 % CPU quota → ONE ``cpu_stall`` with ``signal: throttling``;
* 8 busy processes pinned to CPU 0 → ONE ``cpu_stall`` with ``signal: runq_latency`` (run-queue
  sampling opted in: ``runq_sampling = true``);
* the default agent (no opt-in) leaves the sched_switch hook loaded but detached, says so
  (capability ``runq_sampling`` 0, one info line), and still reports PSI and throttling stalls;
* the hook attached and detached at runtime by a config change, never reloaded;
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
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tapio.observers.cgroups.roots import discover_roots
from tapio.occurrence import parse_timestamp

from . import memload
from .cgroups import (
    Layout,
    cgroup_dirs,
    layout,
    memory_events,
    missing,
    set_cpu_quota,
    set_memory_limit,
)
from .harness import OBJECTS, TIME_SCALE, AgentProcess, agent, require_kernel, wait_until
from .test_controller_kernel import metric

pytestmark = pytest.mark.kernel

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
    """Start ``argv`` already inside ``dirs`` (and pinned to ``cpus``) before it execs.

    A shell moves itself into the cgroups and then execs the load (through ``taskset`` when
    pinned), so the pid stays the load's. Not a ``preexec_fn``: that runs Python between fork
    and exec, and in a test process with other threads (the whole suite leaves idle worker
    threads behind) the child can deadlock on a lock one of them held at the fork, never exec,
    and so never load anything: a memory-pressure run once saw its cgroup's PSI at total=0.
    """
    script = "".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))} && " for d in dirs)
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus is not None else []
    return subprocess.Popen(
        ["sh", "-c", script + 'exec "$@"', "sh", *pin, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_stat(d: Path) -> dict[str, int]:
    """``cpu.stat`` of a cpu controller directory (v1 or v2) as numbers."""
    out: dict[str, int] = {}
    for line in (d / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


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


def test_memory_pressure_in_a_limited_cgroup(tmp_path: Path) -> None:
    """ONE ``memory_pressure`` naming the cgroup under pressure (the node's echo folded in), from
    the load that fits the layout the observer sees (:mod:`.memload`): anonymous memory above
    ``memory.high`` on cgroup v2, page-cache thrash under a v1 limit on a hybrid host."""
    lay = _require_psi_and("memory", "unified")
    roots = discover_roots()
    how = memload.mode(roots)
    # The test creates its cgroups where the observer looks for them, or it proves nothing.
    assert (roots.unified, roots.memory) == (lay.unified, lay.memory), (roots, lay)
    # The load lasts the whole (time-scaled) wait and the check after it: it is killed when the
    # test ends.
    secs = (30 + 8) * TIME_SCALE + 30
    if how == "high":
        argv = memload.alloc_argv(sys.executable, secs)
    else:
        argv = memload.thrash_argv(sys.executable, secs)  # writes the file first
    name = f"tapio-node-mem-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with cgroup_dirs(("memory", "unified"), name, ("memory",)) as dirs:
            if how == "high":
                memload.set_memory_high(dirs["memory"])
            else:
                set_memory_limit(dirs["memory"], memload.LIMIT_MIB * memload.MIB)
            # An earlier test's pressure on the node would be an incident of its own.
            wait_for_quiet_memory()
            # The cgroup exists before the agent starts, so the first discovery pass sees it.
            with agent(tmp_path, observers=("node",)) as a:
                start = time.monotonic()
                procs.append(spawn(argv, list(dict.fromkeys(dirs.values()))))
                first = wait_until(
                    lambda: node_occurrences(a, "kernel.node.memory_pressure", cgroup=f"/{name}"),
                    timeout=30,
                    interval=0.5,
                )
                assert first, (
                    f"no memory_pressure for /{name} within 30 s ({how}; the load's exit "
                    f"status: {procs[0].poll()}); cgroup PSI now: "
                    f"{(dirs['unified'] / 'memory.pressure').read_text()!r}\n"
                    f"{a.stderr()[-3000:]}"
                )
                latency = time.monotonic() - start
                time.sleep(8)  # the load goes on: still exactly one occurrence
                assert procs[0].poll() is None, f"the {how} load died (OOM?)"
                mine = node_occurrences(a, "kernel.node.memory_pressure", cgroup=f"/{name}")
                everything = a.occurrences("kernel.node.memory_pressure")
                clears = [
                    e
                    for e in a.logs()
                    if e.get("event") == "memory pressure cleared"
                    and e.get("target") == f"cgroup /{name}"
                ]
                if how == "high":
                    high = memload.high_events(dirs["memory"])
                else:
                    events = memory_events(dirs["memory"])
        # One incident, one occurrence. A starved guest (an emulated kernel with the host busy)
        # can stall the load itself long enough for the pressure to truly fall under its clear
        # level; the condition then ends (logged with its reading) and the next stall is a new
        # incident. So: exactly one occurrence per start, every start after the first preceded by
        # a logged clear whose reading was under the clear level (10 % x 80 %), never a repeat
        # while the condition lasts.
        assert len(clears) in (len(mine) - 1, len(mine)), (brief(mine), clears)
        assert all(c["some_avg10"] < 8.0 for c in clears), clears
        # In time order they alternate: start, clear, start, (clear). A clear never comes before
        # the start it ends, and a second start only after the first clear.
        starts = sorted(parse_timestamp(o["timestamp"]) for o in mine)
        ends = sorted(parse_timestamp(c["timestamp"]) for c in clears)
        for i, end in enumerate(ends):
            assert starts[i] <= end, (i, brief(mine), clears)
            if i + 1 < len(starts):
                assert end <= starts[i + 1], (i, brief(mine), clears)
        if clears:
            print(f"memory pressure cleared and started again under a starved load: {clears}")
        assert 1 <= len(mine) <= 2, brief(mine)
        # The node shows the same pressure (node some >= cgroup some) but is folded into the
        # cgroup's occurrence rather than reported as a second incident.
        assert len(everything) == len(mine), brief(everything)
        occ = mine[0]
        data = occ["data"]
        assert occ["severity"] == "warning" and occ["outcome"] == "in_progress"
        assert occ["error"]["code"] == "MEMORY_PRESSURE"
        assert f"/{name}" in occ["error"]["message"]
        assert data["scope"] == "cgroup" and data["resource"] == "memory"
        assert data["cgroup_hierarchy"] == "v2"  # PSI is a cgroup2 file in both layouts
        assert data["some_avg10"] >= 10.0 or data["full_avg10"] >= 5.0, data
        assert data["some_total_us"] > 0 and "some_avg60" in data and "full_avg60" in data
        if how == "high":
            # Throttled above memory.high, never at the hard limit, never OOM-killed.
            assert high["high"] > 0 and high["max"] == 0, high
            assert high["oom"] == 0 and high["oom_kill"] == 0, high
        else:
            assert events["limit_hits"] > 0 and events["oom_kill"] == 0, events
        print(f"memory_pressure ({how}) after {latency:.1f}s: {data}")
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
        "runq_sampling = true\n"
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
                nr_throttled = cpu_stat(dirs["cpu"])["nr_throttled"]
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
            # The kernel told every quota wait apart: each throttled period of the busy loop
            # ends in one wait that contained a throttle mark, counted as throttled, not as
            # run-queue latency (a wait re-stamped by a migration after the unthrottle is a real
            # run-queue wait, hence not all of them). Broken, this count would be 0 and the
            # busy loop's 90 ms quota waits would open the run-queue condition at once.
            excluded = metric(metrics, "tapio_node_runq_waits_total", kind="throttled")
            assert nr_throttled > 0 and excluded >= nr_throttled / 2, (excluded, nr_throttled)
            # The busy loop may still be an interval's worst run-queue wait: while it has quota
            # it competes for its CPU with the agent and this test (on a slow or loaded machine,
            # for more than the 10 ms threshold). Such a wait is real run-queue latency; a quota
            # wait never is. The occurrence shows which: its excluded count is the throttled
            # waits the kernel left out of that very interval.
            for o in runq_during_throttle:
                if o["data"].get("worst_pid") == busy.pid:
                    print(f"busy loop worst during throttling (a real wait): {brief([o])}")
                    assert o["data"]["throttled_waits_excluded"] >= 1, o["data"]

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
        assert (
            'tapio_observer_capability{capability="runq_sampling",observer="node"} 1.0' in metrics
        )
        assert metric(metrics, "tapio_node_runq_waits_total", kind="runqueue") > 0
        pmu_lines = [
            e for e in logs if e.get("capability") == "pmu" or "PMU" in str(e.get("detail", ""))
        ]
        assert len(pmu_lines) == 1, pmu_lines
        assert "ipc_degradation" in pmu_lines[0]["detail"]
        print(f"throttling: {t}\nrunq: {r}")
    finally:
        _kill_all(procs)


def _bpftool(*args: str) -> Any:
    tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([tool, *args, "-j"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout or "[]")


def _linked_prog_ids() -> set[int]:
    """Ids of the programs some BPF link (an attachment) holds right now."""
    return {int(link["prog_id"]) for link in _bpftool("link", "show") if "prog_id" in link}


def _loaded_prog_ids() -> set[int]:
    return {int(p["id"]) for p in _bpftool("prog", "show")}


def test_default_agent_leaves_the_runq_hook_detached_and_still_reports_cpu_stalls(
    tmp_path: Path,
) -> None:
    """Without the opt-in the sched_switch hook is loaded, not attached; PSI and throttling
    still find CPU stalls, and the agent says run-queue sampling is off (not degraded)."""
    _require_psi_and("cpu", "unified")
    config = "[thresholds]\nthrottle_pct = 20.0\n[metrics]\nenabled = true\nport = 0\n"
    quota_cg, busy_cg = f"tapio-node-q-{os.getpid()}", f"tapio-node-b-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (
            cgroup_dirs(("cpu", "unified"), quota_cg, ("cpu",)) as qdirs,
            cgroup_dirs(("cpu", "unified"), busy_cg, ("cpu",)) as bdirs,
        ):
            set_cpu_quota(qdirs["cpu"], 10000, 100000)
            with agent(tmp_path, observers=("node",), config=config) as a:
                procs.append(
                    spawn([sys.executable, "-c", BUSY], list(dict.fromkeys(qdirs.values())))
                )
                for _ in range(4):  # 4 on one CPU: 3 always waiting, CPU PSI "some" near 100 %
                    procs.append(
                        spawn(
                            [sys.executable, "-c", BUSY], list(dict.fromkeys(bdirs.values())), {0}
                        )
                    )
                throttled = wait_until(
                    lambda: node_occurrences(
                        a, "kernel.node.cpu_stall", signal="throttling", cgroup=f"/{quota_cg}"
                    ),
                    timeout=20,
                    interval=0.5,
                )
                psi = wait_until(
                    lambda: node_occurrences(a, "kernel.node.cpu_stall", signal="psi"),
                    timeout=30,
                    interval=0.5,
                )
                running = [e for e in a.logs() if e.get("event") == "node observer running"]
                linked, loaded = _linked_prog_ids(), _loaded_prog_ids()
                runq = node_occurrences(a, "kernel.node.cpu_stall", signal="runq_latency")
                metrics = a.metrics_text(0)
                logs = a.logs()
                status = json.loads((a.data_dir / ".tapio-agent-status").read_text())
        assert throttled, f"no throttling cpu_stall for /{quota_cg}\n{a.stderr()[-3000:]}"
        assert psi, f"no PSI cpu_stall\n{a.stderr()[-3000:]}"
        assert runq == [], brief(runq)
        assert len(running) == 1, running
        ids = running[0]["program_ids"]
        hooks = {name: pid for name, pid in ids.items() if name.startswith("node_switch")}
        assert len(hooks) == 1, ids  # one of the two alternatives is loaded ...
        for pid in hooks.values():
            assert pid in loaded and pid not in linked, (hooks, sorted(linked))  # ... detached
        off = 'tapio_observer_capability{capability="runq_sampling",observer="node"} 0.0'
        assert off in metrics, [m for m in metrics.splitlines() if "capability" in m]
        lines = [e for e in logs if e.get("capability") == "runq_sampling"]
        assert len(lines) == 1 and lines[0]["level"] == "info", lines
        assert "runq_sampling = true" in lines[0]["detail"], lines
        node = status["observers"]["node"]
        assert node["state"] == "running" and node["capabilities"]["runq_sampling"] is False
        # Off by configuration is not a degradation: every degraded reason left is a capability
        # this kernel lacks (e.g. no_runq_throttle_split on 5.10, no_pmu in a VM).
        reasons = node.get("degraded_reasons", [])
        assert "no_runq_sampling" not in reasons, node
        for reason in reasons:
            assert node["capabilities"].get(reason.removeprefix("no_")) is False, (reason, node)
        assert not node.get("unsupported", {}).get("kernel.node.cpu_stall"), node
    finally:
        _kill_all(procs)


def test_runq_hook_follows_the_config_at_runtime_without_a_reload() -> None:
    """A config change attaches or detaches the loaded hook (a link, same program id); while
    detached the kernel counts nothing, attached it counts every switch's wait."""
    require_kernel(("node",))
    from tapio.bpf.abi import FLAG_NODE, TapioConfig
    from tapio.metrics import REGISTRY
    from tapio.observers.base import ObserverContext
    from tapio.observers.node import NodeObserver
    from tapio.observers.node.runq import sum_runq_hist
    from tapio.thresholds import Thresholds

    obs = NodeObserver(ObserverContext(boot_offset_ns=0))
    off = TapioConfig(generation=1, flags=FLAG_NODE, runq_latency_threshold_ns=0)
    on = TapioConfig(generation=2, flags=FLAG_NODE, runq_latency_threshold_ns=10_000_000)
    user = Thresholds()
    cap = {"observer": "node", "capability": "runq_sampling"}

    with obs.open_object(OBJECTS / "node.bpf.o") as obj:

        def waits() -> int:
            raw = obj.map("runq_hist").lookup(bytes(4))
            return sum_runq_hist(raw).waits if raw is not None else 0

        def configure(cfg: TapioConfig) -> None:
            obs.on_config(cfg, user)
            obj.map("tapio_config").update(bytes(4), cfg.pack())

        def settled_waits() -> tuple[int, int]:
            time.sleep(0.2)  # a switch already inside the program finishes
            first = waits()
            time.sleep(0.5 * TIME_SCALE)
            return first, waits()

        obj.map("tapio_config").update(bytes(4), off.pack())
        obs.on_config(off, user)
        obs.attach(obj)
        obs.note_programs(obj)
        try:
            ids = obj.program_ids()
            prog = obs.runq_program()
            assert prog is not None and not obs.runq_on
            assert ids[prog] not in _linked_prog_ids()
            before, after = settled_waits()
            assert before == after == 0, (before, after)
            caps = {c.name: c for c in obs.capabilities()}
            assert not caps["runq_sampling"].available and caps["runq_sampling"].off
            assert REGISTRY.get_sample_value("tapio_observer_capability", cap) == 0

            for _round in range(2):
                configure(on)
                assert obs.runq_on and ids[prog] in _linked_prog_ids()
                assert REGISTRY.get_sample_value("tapio_observer_capability", cap) == 1
                start = waits()
                assert wait_until(lambda s=start: waits() > s, timeout=5, interval=0.1)
                configure(off)
                assert not obs.runq_on and ids[prog] not in _linked_prog_ids()
                assert REGISTRY.get_sample_value("tapio_observer_capability", cap) == 0
                before, after = settled_waits()
                assert before == after, (before, after)
            assert obj.program_ids() == ids  # never reloaded
        finally:
            obs.close()
