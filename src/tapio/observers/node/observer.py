"""Node observer: memory pressure, CPU stall and (with hardware counters) IPC degradation.

Signals: PSI of the node and of watched cgroup2 directories (memory and cpu), run-queue latency
aggregated in kernel maps by ``node.bpf.c`` (opt-in: its sched_switch hook is attached only while
the config asks for run-queue sampling, capability ``runq_sampling``), CFS bandwidth throttling
from ``cpu.stat``, and,
only with hardware counters, IPC and backend stalls (otherwise the capability ``pmu`` is
unavailable, ``degraded_reasons: ["no_pmu"]``, and the rest keeps working). Every condition is
edge-triggered with hysteresis (:mod:`.board`): one occurrence when it starts (built in
:mod:`.judges`), none while it lasts, a log line when it clears. docs/observers/node.md has the
thresholds and facts; the container a cgroup or task belongs to is added by the enrichment stage.
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
from tapio.bpf.features import ProgramSpec
from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import BpfObject
from tapio.metrics import OBSERVER_CAPABILITY
from tapio.observers.base import Capability, Emit, Observer, ObserverContext, UserThresholds
from tapio.observers.cgroups import ByCgroupPath, CgroupRoots, Enrichment, discover_roots
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
from tapio.observers.node.psi import NODE, PsiReading, PsiWatch
from tapio.observers.node.runq import (
    RUNQ_HIST,
    RUNQ_WAITS,
    RunqTotals,
    WorstWait,
    sum_runq_hist,
    worst_of,
)
from tapio.observers.node.throttle import ThrottleDelta, ThrottleWatch
from tapio.occurrence import NODE_CPU_STALL, NODE_MEMORY_PRESSURE, Occurrence

log = structlog.get_logger("tapio.observers.node")

METRIC_CLOCK_SKEW = METRIC_OBSERVER_BASE + 0
TICK_SECS = judges.TICK_SECS  # run-queue, throttling and PMU intervals
PSI_SAMPLE_SECS = 2.0  # PSI sampling (a fired trigger samples at once)
RESCAN_SECS = 10.0  # cgroup discovery
MAX_TRIGGERS = 64  # PSI trigger fds per resource (memory, cpu)
RUNQ_MIN_OVER = 3  # waits over the threshold in one interval before the condition starts
PMU_MIN_CYCLES = 10_000_000  # cycles per interval before IPC means anything
RUNQ_PROGRAMS = ("node_switch", "node_switch_basic")  # alternatives: at most one is loaded
RUNQ_OFF = (
    "off by configuration: run-queue latency sampling is opt-in ([thresholds] runq_sampling = "
    "true, or node.runq_sampling in the Evidence Profile); cpu_stall still comes from PSI and "
    "CPU throttling"
)


class NodeObserver(Observer):
    name = "node"
    object_name = "node"
    record = RUNQ_HIST
    ring_map = None
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {
        METRIC_CLOCK_SKEW: ("kernel_drop", "runq_clock_skew"),
    }
    # Two builds of one sched_switch hook: with task-local storage (quota-throttled waits told
    # apart) and without it (kernels < 5.11: runq_throttle_split reported unavailable).
    # cpu_stall also has PSI, so no anomaly type depends on the hook alone.
    programs: ClassVar[tuple[ProgramSpec, ...]] = (
        ProgramSpec("node_switch", "runq_throttle_split", group="runq", maps=("runq_throttled",)),
        ProgramSpec("node_switch_basic", "runq_hook", group="runq"),
    )
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
        self.pmu = pmu_mod.PmuWatch()
        self._mem_board = PressureBoard()
        self._cpu_board = PressureBoard()
        self._runq_edge = Hysteresis()
        self._runq_prev: RunqTotals | None = None
        self.throttle = ThrottleWatch()
        self.psi = PsiWatch(self.roots.unified, MAX_TRIGGERS)
        self._ipc_edge = Hysteresis()
        self._stall_edge = Hysteresis()
        self._last_scan = -1e9
        #: why attaching the run-queue hook failed at runtime (None: it did not fail)
        self._runq_error: str | None = None
        #: the run-queue hook's link while attached (owned here: created and destroyed on
        #: config changes, destroyed in ``close`` before the object is closed)
        self._runq_link: object | None = None
        #: the kernel totals already added to RUNQ_WAITS (the maps count from load)
        self._runq_seen = RunqTotals.zero()

    # ---- lifecycle ---------------------------------------------------------------------
    def attach(self, obj: BpfObject) -> None:
        """Only loads: the run-queue hook is attached when the config asks for it
        (:meth:`sync_runq`), so a node that does not opt in pays nothing per context switch."""
        self._obj = obj
        for name in ("runq_hist", "runq_worst"):
            obj.map(name)  # fail early (BpfError) if the object is not ours
        self.sync_runq()
        if not self.pmu.probe():
            self._degrade_pmu()
            self.pmu.detail += (
                "; kernel.node.ipc_degradation and the counter-based cpu_stall are unsupported, "
                "memory_pressure and cpu_stall (PSI, run-queue latency, throttling) still work"
            )

    def _degrade_pmu(self) -> None:
        if "no_pmu" not in self.degraded_reasons:
            self.degraded_reasons.append("no_pmu")

    def note_programs(self, obj: BpfObject) -> None:
        """As for every observer, except that a loaded run-queue hook left detached because the
        config does not ask for it is not "no program runs": PSI and throttling still do."""
        try:
            super().note_programs(obj)
        except BpfError:
            if self.runq_program() is None:
                raise

    # ---- run-queue sampling: attached only while configured -----------------------------------
    def runq_program(self) -> str | None:
        """The run-queue hook loaded on this kernel (one of :data:`RUNQ_PROGRAMS`), if any."""
        if self._obj is None:
            return None
        return next((n for n in RUNQ_PROGRAMS if n in self._obj.programs), None)

    @property
    def runq_on(self) -> bool:
        return self._runq_link is not None

    def runq_wanted(self) -> bool:
        return self.enabled and self.kernel.runq_latency_threshold_ns > 0

    def sync_runq(self) -> None:
        """Attach or detach the loaded hook to match the config; the program is never reloaded
        (same id, same maps), a config change only creates or destroys its link."""
        prog = self.runq_program()
        if prog is None or self._obj is None:
            return
        want, on = self.runq_wanted(), self.runq_on
        if want and not on:
            program = self._obj.programs[prog]
            try:
                self._runq_link = lb.check_ptr(
                    lb.lib().bpf_program__attach(program.ptr),
                    f"attach of node/{prog} ({program.section})",
                )
            except BpfError as exc:
                self._runq_error = f"attach failed: {exc}"[:240]
                log.warning("run-queue sampling not attached", program=prog, error=str(exc))
            else:
                self._runq_error = None
                log.info("run-queue sampling on", program=prog)
        elif on and not want:
            self._detach_runq()
            log.info("run-queue sampling off", program=prog, detail=RUNQ_OFF)
        if want != on:
            self._runq_edge = Hysteresis()
            self._runq_prev = None
        OBSERVER_CAPABILITY.labels(observer=self.name, capability="runq_sampling").set(
            1 if self.runq_on else 0
        )

    def _detach_runq(self) -> None:
        link, self._runq_link = self._runq_link, None
        if link is not None:
            lb.lib().bpf_link__destroy(link)

    def capabilities(self) -> list[Capability]:
        caps = [*super().capabilities(), Capability("pmu", self.pmu.available, self.pmu.detail)]
        if self.runq_program() is not None:
            on = self.runq_on
            error = self._runq_error if self.runq_wanted() else None
            detail = "" if on else (error or RUNQ_OFF)
            caps.append(Capability("runq_sampling", on, detail, off=not on and error is None))
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
        self.sync_runq()

    def _reset_state(self) -> None:
        self._mem_board.reset()
        self._cpu_board.reset()
        self._runq_edge = Hysteresis()
        self._runq_prev = None
        self.throttle.reset()
        self._ipc_edge = Hysteresis()
        self._stall_edge = Hysteresis()
        self.pmu.forget()

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        """The node object has no ring buffer: everything is read from kernel maps in ``run``."""
        return []

    def close(self) -> None:
        self._detach_runq()
        self.psi.close()
        self.pmu.close()
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
        self.psi.cgroups = watched.psi_cgroups
        self.throttle.apply(watched.quotas)

    def sample_psi(self) -> tuple[dict[str, PsiReading], dict[str, PsiReading]]:
        return self.psi.sample()

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
                if self.psi.triggers is not None:
                    self.psi.triggers.failures.clear()
            if self.enabled:
                u = self.user
                self.psi.sync(min(u.memory_some_pct, u.memory_full_pct), u.cpu_some_pct)
                mem, cpu = self.sample_psi()
                batch = self.judge_psi(mem, cpu, time.time_ns())
                if batch:
                    await emit(batch)
            # Sleep until the next sample, or until an armed trigger fires.
            with anyio.move_on_after(PSI_SAMPLE_SECS):
                ts = self.psi.triggers
                if self.enabled and ts is not None and ts.paths:
                    await anyio.wait_readable(ts.fileno())
                    ts.fired()
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
        """Cumulative totals and the interval's worst wait (whose slots are then zeroed); nothing
        while the hook is detached."""
        if self._obj is None or not self.runq_on:
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
        if totals is not None:
            seen, self._runq_seen = self._runq_seen, totals
            RUNQ_WAITS.labels(kind="runqueue").inc(max(0, totals.waits - seen.waits))
            RUNQ_WAITS.labels(kind="throttled").inc(
                max(0, totals.throttled_waits - seen.throttled_waits)
            )
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
        return self.throttle.read()

    def judge_throttling(
        self, deltas: dict[tuple[str, str], ThrottleDelta], now_ns: int
    ) -> list[Occurrence]:
        if not self.enabled:
            return []
        u = self.user
        out: list[Occurrence] = []
        for key, d, tr in self.throttle.step(deltas, u.throttle_pct, u.hysteresis_pct):
            hierarchy, path = key
            if tr is Transition.CLEAR:
                log.info("cpu throttling cleared", cgroup=path, throttled_pct=round(d.pct, 1))
                continue
            q = self.throttle.quota.get(key)
            gen = self.kernel.generation
            out.append(judges.throttle_occurrence(hierarchy, path, d, q, u, gen, now_ns))
        return out

    def tick_pmu(self, now_ns: int) -> list[Occurrence]:
        try:
            sample = self.pmu.tick(self.user.node_pmc_enabled)
        except OSError:
            self._degrade_pmu()
            log.warning("hardware counters unavailable", detail=self.pmu.detail)
            return []
        return self.judge_pmu(sample, now_ns)

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
