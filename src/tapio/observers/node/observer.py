"""Node observer: memory pressure, CPU stall and (with hardware counters) IPC degradation.

What the kernel offers without a PMU is enough for two of the three anomalies:

* ``kernel.node.memory_pressure`` — memory PSI of the node (``/proc/pressure/memory``) and of
  every watched cgroup2 directory (``memory.pressure``), ``some``/``full`` avg10 against
  ``memory_some_pct``/``memory_full_pct``.
* ``kernel.node.cpu_stall`` — three signals, each its own condition (fact ``signal``):
  ``psi`` (CPU PSI ``some`` avg10 of the node or a cgroup against ``cpu_some_pct``),
  ``runq_latency`` (run-queue waits measured by ``node.bpf.c`` and aggregated in kernel maps,
  against ``runq_latency_threshold_ns``) and ``throttling`` (CFS bandwidth: the share of
  ``cpu.stat`` periods that were throttled, against ``throttle_pct``, per cgroup with a quota).
* ``kernel.node.ipc_degradation`` and the counter-based ``cpu_stall`` (``signal: "pmu"``) only
  with hardware counters; otherwise the capability ``pmu`` is reported unavailable (metric,
  one log line, ``degraded_reasons: ["no_pmu"]``) and the rest keeps working.

Every condition is edge-triggered with hysteresis (:class:`~tapio.observers.node.board.Hysteresis`):
one occurrence when it starts, none while it lasts, none when it clears (the clear is logged at
info level); it clears when the value falls under ``threshold × hysteresis_pct / 100``. The
occurrences themselves are built in :mod:`tapio.observers.node.judges`; the container a cgroup
or the worst waiting task belongs to is added by the enrichment stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.to_thread
import structlog

from tapio.bpf import libbpf as lb
from tapio.bpf.abi import FLAG_NODE, METRIC_OBSERVER_BASE, TAPIO_CONFIG_ABI_VERSION, TapioConfig
from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import BpfObject
from tapio.observers.base import Capability, Emit, Observer, ObserverContext, UserThresholds
from tapio.observers.cgroups import CgroupRoots, discover_roots
from tapio.observers.enrich import ByCgroupPath, Enrichment
from tapio.observers.node import judges
from tapio.observers.node import pmu as pmu_mod
from tapio.observers.node.board import (
    Hysteresis,
    PressureBoard,
    Transition,
    above,
    below,
    cpu_judge,
    memory_judge,
)
from tapio.observers.node.discovery import Watched, discover
from tapio.observers.node.psi import NODE, PsiReading, TriggerSet, read_psi
from tapio.observers.node.runq import RUNQ_HIST, RunqTotals, WorstWait, sum_runq_hist, worst_of
from tapio.observers.node.throttle import QuotaCgroup, ThrottleDelta, parse_cpu_stat, throttle_delta
from tapio.occurrence import NODE_CPU_STALL, NODE_MEMORY_PRESSURE, Occurrence

log = structlog.get_logger("tapio.observers.node")

METRIC_CLOCK_SKEW = METRIC_OBSERVER_BASE + 0
TICK_SECS = judges.TICK_SECS  # run-queue, throttling and PMU intervals
PSI_SAMPLE_SECS = 2.0  # PSI sampling (a fired trigger samples at once)
RESCAN_SECS = 10.0  # cgroup discovery
MAX_TRIGGERS = 64  # PSI trigger fds per resource (memory, cpu)
RUNQ_MIN_OVER = 3  # waits over the threshold in one interval before the condition starts
THROTTLE_MIN_PERIODS = 5  # periods elapsed in an interval before a throttled share is judged
PMU_MIN_CYCLES = 10_000_000  # cycles per interval before IPC means anything


class NodeObserver(Observer):
    name = "node"
    object_name = "node"
    record = RUNQ_HIST
    ring_map = None
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {
        METRIC_CLOCK_SKEW: ("kernel_drop", "runq_clock_skew"),
    }
    enrichment: ClassVar[dict[str, Enrichment]] = {
        NODE_CPU_STALL: ByCgroupPath(),
        NODE_MEMORY_PRESSURE: ByCgroupPath(),
    }

    def __init__(self, ctx: ObserverContext, *, roots: CgroupRoots | None = None) -> None:
        super().__init__(ctx)
        self.roots = roots if roots is not None else discover_roots()
        self.kernel = TapioConfig(abi_version=0)
        self.user = UserThresholds()
        self.enabled = False
        self._obj: BpfObject | None = None
        self._pmu_available = False
        self._pmu_detail = "not probed"
        self._pmu: pmu_mod.PmuSampler | None = None
        self._pmu_prev: list[pmu_mod.CpuReadings | None] | None = None
        self._mem_board = PressureBoard()
        self._cpu_board = PressureBoard()
        self._runq_edge = Hysteresis()
        self._runq_prev: RunqTotals | None = None
        self._throttle_edges: dict[tuple[str, str], Hysteresis] = {}
        self._quota: dict[tuple[str, str], QuotaCgroup] = {}
        self._psi_cgroups: list[str] = []
        self._ipc_edge = Hysteresis()
        self._stall_edge = Hysteresis()
        self._triggers: TriggerSet | None = None
        self._triggers_armed_for: tuple[float, float] | None = None
        self._last_scan = -1e9

    # ---- lifecycle ---------------------------------------------------------------------
    def attach(self, obj: BpfObject) -> None:
        self._obj = obj
        for name in ("runq_hist", "runq_worst"):
            obj.map(name)  # fail early (BpfError) if the object is not ours
        obj.attach_all()
        self._pmu_available, self._pmu_detail = pmu_mod.probe()
        if not self._pmu_available:
            self._degrade_pmu()
            self._pmu_detail += (
                "; kernel.node.ipc_degradation and the counter-based cpu_stall are unsupported, "
                "memory_pressure and cpu_stall (PSI, run-queue latency, throttling) still work"
            )

    def _degrade_pmu(self) -> None:
        if "no_pmu" not in self.degraded_reasons:
            self.degraded_reasons.append("no_pmu")

    def capabilities(self) -> list[Capability]:
        caps = [Capability("pmu", self._pmu_available, self._pmu_detail)]
        for name, probe, missing in (
            (
                "runq_latency",
                "/proc/self/schedstat",
                "kernel without CONFIG_SCHED_INFO: no run-queue stamps",
            ),
            ("psi", "/proc/pressure/memory", "/proc/pressure missing (CONFIG_PSI off or psi=0)"),
        ):
            ok = Path(probe).exists()
            caps.append(Capability(name, ok, "" if ok else missing))
        return caps

    def on_config(self, kernel: TapioConfig, user: UserThresholds) -> None:
        self.kernel = kernel
        self.user = user
        enabled = kernel.abi_version == TAPIO_CONFIG_ABI_VERSION and bool(kernel.flags & FLAG_NODE)
        if enabled != self.enabled or not enabled:
            self._reset_state()
        self.enabled = enabled

    def _reset_state(self) -> None:
        self._mem_board.reset()
        self._cpu_board.reset()
        self._runq_edge = Hysteresis()
        self._runq_prev = None
        self._throttle_edges.clear()
        for q in self._quota.values():
            q.prev = None
        self._ipc_edge = Hysteresis()
        self._stall_edge = Hysteresis()
        self._pmu_prev = None

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        """The node object has no ring buffer: everything is read from kernel maps in ``run``."""
        return []

    def close(self) -> None:
        if self._triggers is not None:
            self._triggers.close()
            self._triggers = None
            self._triggers_armed_for = None
        if self._pmu is not None:
            self._pmu.close()
            self._pmu = None
        self._obj = None

    async def run(self, emit: Emit) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._psi_loop, emit)
                tg.start_soon(self._tick_loop, emit)
        finally:
            self.close()

    # ---- discovery -----------------------------------------------------------------------
    def rescan(self) -> None:
        """Which cgroups to watch, now (blocking: the running observer walks in a thread)."""
        self.apply_scan(discover(self.roots))

    def apply_scan(self, watched: Watched) -> None:
        self._last_scan = time.monotonic()
        self._psi_cgroups = watched.psi_cgroups
        for key in [k for k in self._quota if k not in watched.quotas]:
            del self._quota[key]
            self._throttle_edges.pop(key, None)
        for key, (stat, quota, period) in watched.quotas.items():
            cur = self._quota.get(key)
            if cur is None:
                self._quota[key] = QuotaCgroup(key[0], key[1], stat, quota, period)
            else:
                cur.quota_us, cur.period_us = quota, period

    def _psi_path(self, key: str, resource: str) -> str:
        if key == NODE:
            return f"/proc/pressure/{resource}"
        assert self.roots.unified is not None
        return f"{self.roots.unified}{key}/{resource}.pressure"

    # ---- PSI ------------------------------------------------------------------------------
    def _sync_triggers(self) -> None:
        """Arm triggers on the node and the watched cgroups (bounded); re-arm on new thresholds.

        Paths that refused a trigger are not retried until the next rescan; they are sampled.
        """
        u = self.user
        want = (min(u.memory_some_pct, u.memory_full_pct), u.cpu_some_pct)
        if self._triggers is None or self._triggers_armed_for != want:
            if self._triggers is not None:
                self._triggers.close()
            self._triggers = TriggerSet(2 * MAX_TRIGGERS)
            self._triggers_armed_for = want
        ts = self._triggers
        wanted: dict[str, float] = {}
        for resource, pct in (("memory", want[0]), ("cpu", want[1])):
            for k in (NODE, *self._psi_cgroups):
                wanted[self._psi_path(k, resource)] = pct
        for stale in ts.paths - set(wanted):
            ts.disarm(stale)
        for path, pct in wanted.items():
            if path not in ts.failures:
                ts.arm(path, pct)

    def sample_psi(self) -> tuple[dict[str, PsiReading], dict[str, PsiReading]]:
        mem: dict[str, PsiReading] = {}
        cpu: dict[str, PsiReading] = {}
        for key in (NODE, *self._psi_cgroups):
            r = read_psi(self._psi_path(key, "memory"))
            if r is not None:
                mem[key] = r
            r = read_psi(self._psi_path(key, "cpu"))
            if r is not None:
                cpu[key] = r
        return mem, cpu

    def judge_psi(
        self, mem: dict[str, PsiReading], cpu: dict[str, PsiReading], now_ns: int
    ) -> list[Occurrence]:
        if not self.enabled:
            return []
        u = self.user
        out: list[Occurrence] = []
        boards = (
            ("memory", self._mem_board, mem, memory_judge(*self._mem_levels())),
            ("cpu", self._cpu_board, cpu, cpu_judge(u.cpu_some_pct, u.hysteresis_pct)),
        )
        for resource, board, readings, judge in boards:
            for rep in board.step(readings, judge):
                if rep.transition is Transition.CLEAR:
                    target = "node" if rep.key == NODE else f"cgroup {rep.key}"
                    log.info(
                        f"{resource} pressure cleared",
                        target=target,
                        some_avg10=rep.reading.some.avg10,
                    )
                    continue
                out.append(judges.psi_occurrence(resource, rep, u, self.kernel.generation, now_ns))
        return out

    def _mem_levels(self) -> tuple[float, float, float]:
        u = self.user
        return u.memory_some_pct, u.memory_full_pct, u.hysteresis_pct

    async def _psi_loop(self, emit: Emit) -> None:
        while True:
            if self.enabled and time.monotonic() - self._last_scan >= RESCAN_SECS:
                self.apply_scan(await anyio.to_thread.run_sync(discover, self.roots))
                if self._triggers is not None:
                    self._triggers.failures.clear()
            if self.enabled:
                self._sync_triggers()
                mem, cpu = self.sample_psi()
                batch = self.judge_psi(mem, cpu, time.time_ns())
                if batch:
                    await emit(batch)
            # Sleep until the next sample, or until an armed trigger fires.
            with anyio.move_on_after(PSI_SAMPLE_SECS):
                if self.enabled and self._triggers is not None and self._triggers.paths:
                    await anyio.wait_readable(self._triggers.fileno())
                    self._triggers.fired()
                    await anyio.sleep(0.5)  # batch sibling triggers: at most 2 samples/s
                else:
                    await anyio.sleep(PSI_SAMPLE_SECS)

    # ---- run-queue, throttling, PMU ---------------------------------------------------------
    async def _tick_loop(self, emit: Emit) -> None:
        while True:
            await anyio.sleep(TICK_SECS)
            if not self.enabled:
                continue
            now = time.time_ns()
            batch: list[Occurrence] = []
            occ = self.judge_runq(*self.read_runq(), now)
            if occ is not None:
                batch.append(occ)
            batch.extend(self.judge_throttling(self.read_throttling(), now))
            batch.extend(self.tick_pmu(now))
            if batch:
                await emit(batch)

    def read_runq(self) -> tuple[RunqTotals | None, WorstWait | None]:
        """Cumulative totals and the interval's worst wait (whose slots are then zeroed)."""
        if self._obj is None:
            return None, None
        try:
            hist_raw = self._obj.map("runq_hist").lookup(bytes(4))
            worst_map = self._obj.map("runq_worst")
            worst_raw = worst_map.lookup(bytes(4))
            if worst_raw is not None:
                lib = lb.lib()
                rc = lib.bpf_map_update_elem(worst_map.fd, bytes(4), bytes(len(worst_raw)), 0)
                lb.check_rc(rc, "reset of runq_worst")
        except BpfError as exc:
            log.warning("run-queue maps unreadable", error=str(exc))
            return None, None
        totals = sum_runq_hist(hist_raw) if hist_raw is not None else None
        worst = worst_of(worst_raw) if worst_raw is not None else None
        return totals, worst

    def judge_runq(
        self, totals: RunqTotals | None, worst: WorstWait | None, now_ns: int
    ) -> Occurrence | None:
        threshold = self.kernel.runq_latency_threshold_ns
        if totals is None or threshold <= 0 or not self.enabled:
            return None
        prev, self._runq_prev = self._runq_prev, totals
        if prev is None:
            return None
        d = totals.minus(prev)
        if d.waits < 0:
            return None
        max_ns = worst.max_ns if worst is not None else 0
        h = self.user.hysteresis_pct
        starts = d.over >= RUNQ_MIN_OVER and max_ns >= threshold
        _, clears = above(max_ns, threshold, h)
        tr = self._runq_edge.step(starts, clears)
        if tr is Transition.CLEAR:
            log.info("run-queue latency cleared", max_ms=round(max_ns / 1e6, 3))
            return None
        if tr is not Transition.START:
            return None
        return judges.runq_occurrence(d, worst, threshold, h, self.kernel.generation, now_ns)

    def read_throttling(self) -> dict[tuple[str, str], ThrottleDelta]:
        out: dict[tuple[str, str], ThrottleDelta] = {}
        for key, q in self._quota.items():
            try:
                stat = parse_cpu_stat(q.stat_file.read_text())
            except OSError:
                stat = None
            if stat is None:
                q.prev = None
                continue
            prev, q.prev = q.prev, stat
            if prev is None:
                continue
            delta = throttle_delta(prev, stat)
            if delta is not None:
                out[key] = delta
        return out

    def judge_throttling(
        self, deltas: dict[tuple[str, str], ThrottleDelta], now_ns: int
    ) -> list[Occurrence]:
        if not self.enabled:
            return []
        u = self.user
        out: list[Occurrence] = []
        for key, d in deltas.items():
            edge = self._throttle_edges.setdefault(key, Hysteresis())
            if d.periods < THROTTLE_MIN_PERIODS:
                starts, clears = False, d.periods == 0
            else:
                starts, clears = above(d.pct, u.throttle_pct, u.hysteresis_pct)
            tr = edge.step(starts, clears)
            hierarchy, path = key
            if tr is Transition.CLEAR:
                log.info("cpu throttling cleared", cgroup=path, throttled_pct=round(d.pct, 1))
            elif tr is Transition.START:
                out.append(
                    judges.throttle_occurrence(
                        hierarchy, path, d, self._quota.get(key), u, self.kernel.generation, now_ns
                    )
                )
        for key in [k for k in self._throttle_edges if k not in self._quota]:
            del self._throttle_edges[key]
        return out

    def tick_pmu(self, now_ns: int) -> list[Occurrence]:
        if not self._pmu_available or not self.user.node_pmc_enabled:
            if self._pmu is not None:
                self._pmu.close()
                self._pmu = None
                self._pmu_prev = None
            return []
        if self._pmu is None:
            try:
                self._pmu = pmu_mod.PmuSampler()
            except OSError as exc:
                self._pmu_available = False
                self._pmu_detail = f"hardware counters could not be opened: {exc}"
                self._degrade_pmu()
                log.warning("hardware counters unavailable", detail=self._pmu_detail)
                return []
        cur = self._pmu.read()
        prev, self._pmu_prev = self._pmu_prev, cur
        if prev is None:
            return []
        return self.judge_pmu(pmu_mod.interval_sample(prev, cur), now_ns)

    def judge_pmu(self, sample: pmu_mod.IntervalSample | None, now_ns: int) -> list[Occurrence]:
        """IPC and stall share of one interval (edge-triggered, hysteresis as everywhere)."""
        if sample is None or sample.cycles < PMU_MIN_CYCLES or not self.enabled:
            return []
        u = self.user
        gen = self.kernel.generation
        out: list[Occurrence] = []
        tr = self._ipc_edge.step(*below(sample.ipc, u.ipc_degradation, u.hysteresis_pct))
        if tr is Transition.START:
            out.append(judges.ipc_occurrence(sample, u, gen, now_ns))
        stall = sample.stall_pct
        if stall is not None:
            tr = self._stall_edge.step(*above(stall, u.stall_pct_warning, u.hysteresis_pct))
            if tr is Transition.START:
                out.append(judges.pmu_stall_occurrence(sample, stall, u, gen, now_ns))
        return out
