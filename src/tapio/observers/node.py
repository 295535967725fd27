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

Every condition is edge-triggered with hysteresis (:class:`tapio.observers.psi.Hysteresis`): one
occurrence when it starts, none while it lasts, none when it clears (the clear is logged at
info level); it clears when the value falls under ``threshold × hysteresis_pct / 100``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import structlog

from tapio.bpf import libbpf as lb
from tapio.bpf.abi import (
    FLAG_NODE,
    METRIC_OBSERVER_BASE,
    TAPIO_CONFIG_ABI_VERSION,
    CStruct,
    TapioConfig,
)
from tapio.bpf.features import ProgramSpec
from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import BpfObject
from tapio.observers import pmu as pmu_mod
from tapio.observers.base import Capability, Emit, Observer, ObserverContext, UserThresholds
from tapio.observers.psi import (
    NODE,
    Hysteresis,
    PressureBoard,
    PsiReading,
    Report,
    Transition,
    TriggerSet,
    above,
    below,
    cpu_judge,
    memory_judge,
    psi_facts,
    read_psi,
)
from tapio.occurrence import (
    NODE_CPU_STALL,
    NODE_IPC_DEGRADATION,
    NODE_MEMORY_PRESSURE,
    Occurrence,
    Severity,
    new_occurrence,
)

log = structlog.get_logger("tapio.observers.node")

# ---- kernel ABI (bpf/node.h) ------------------------------------------------------------------

RUNQ_SLOTS = 24
RUNQ_HIST = CStruct(
    "runq_hist",
    [
        ("waits", "Q"),
        ("wait_ns", "Q"),
        ("over", "Q"),
        ("throttled_waits", "Q"),
        ("throttled_ns", "Q"),
        ("slots", f"{RUNQ_SLOTS}Q"),
    ],
    232,
)
RUNQ_WORST = CStruct(
    "runq_worst",
    [
        ("max_ns", "Q"),
        ("cgroup_id", "Q"),
        ("timestamp_ns", "Q"),
        ("pid", "I"),
        ("tid", "I"),
        ("config_generation", "I"),
        ("_pad", "4x"),
        ("comm", "16s"),
    ],
    56,
)
METRIC_CLOCK_SKEW = METRIC_OBSERVER_BASE + 0

# ---- bounds and cadence -----------------------------------------------------------------------

TICK_SECS = 1.0  # run-queue, throttling and PMU intervals
PSI_SAMPLE_SECS = 2.0  # PSI sampling (a fired trigger samples at once)
RESCAN_SECS = 10.0  # cgroup discovery
MAX_CGROUPS = 256  # cgroup2 directories watched for PSI
MAX_QUOTA_CGROUPS = 256  # cgroups with a CPU quota watched for throttling
MAX_TRIGGERS = 64  # PSI trigger fds per resource (memory, cpu)
MAX_WALK = 8192  # directories visited per discovery pass
MAX_DEPTH = 12
RUNQ_MIN_OVER = 3  # waits over the threshold in one interval before the condition starts
THROTTLE_MIN_PERIODS = 5  # periods elapsed in an interval before a throttled share is judged
PMU_MIN_CYCLES = 10_000_000  # cycles per interval before IPC means anything

_CONTAINERISH = re.compile(
    r"(kubepods|docker|containerd|crio|libpod|lxc|machine\.slice|[0-9a-f]{64}|\.scope$)"
)


# ---- cgroup discovery -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupRoots:
    unified: Path | None  # the cgroup2 mount (hybrid: /sys/fs/cgroup/unified)
    cpu_v1: Path | None  # the v1 cpu controller mount, None on a pure cgroup2 host


def discover_roots(mountinfo: str = "/proc/self/mountinfo") -> CgroupRoots:
    unified: Path | None = None
    cpu_v1: Path | None = None
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return CgroupRoots(None, None)
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3 or fields[3] != "/":
            continue
        mnt = Path(fields[4].replace("\\040", " "))
        if rfields[0] == "cgroup2" and unified is None:
            unified = mnt
        elif rfields[0] == "cgroup" and cpu_v1 is None and "cpu" in rfields[2].split(","):
            cpu_v1 = mnt
    return CgroupRoots(unified, cpu_v1)


def walk_cgroups(root: Path, max_walk: int = MAX_WALK, max_depth: int = MAX_DEPTH) -> Iterator[str]:
    """Cgroup directories under ``root`` (breadth first, root excluded) as ``/a/b`` paths."""
    queue: deque[tuple[Path, str, int]] = deque([(root, "", 0)])
    visited = 0
    while queue and visited < max_walk:
        path, rel, depth = queue.popleft()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            visited += 1
            child = f"{rel}/{entry.name}"
            yield child
            if depth + 1 < max_depth:
                queue.append((Path(entry.path), child, depth + 1))
            if visited >= max_walk:
                return


def pick_cgroups(paths: Sequence[str], cap: int) -> list[str]:
    """At most ``cap`` paths: container/pod-looking ones first, then the shallowest."""
    ranked = sorted(
        enumerate(paths), key=lambda ip: (0 if _CONTAINERISH.search(ip[1]) else 1, ip[0])
    )
    return [p for _, p in ranked[:cap]]


def has_quota_v1(directory: Path) -> tuple[int, int] | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return (quota, period) if quota > 0 else None


def has_quota_v2(directory: Path) -> tuple[int, int] | None:
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        return int(fields[0]), int(fields[1])
    except ValueError:
        return None


# ---- CFS bandwidth throttling -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuStat:
    nr_periods: int
    nr_throttled: int
    throttled_ns: int


def parse_cpu_stat(text: str) -> CpuStat | None:
    """v1 ``cpu.stat`` (``throttled_time`` ns) or v2 (``throttled_usec``); None without
    bandwidth fields (a v2 cgroup without the cpu controller)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    if "nr_periods" not in values or "nr_throttled" not in values:
        return None
    if "throttled_time" in values:
        ns = values["throttled_time"]
    else:
        ns = values.get("throttled_usec", 0) * 1000
    return CpuStat(values["nr_periods"], values["nr_throttled"], ns)


@dataclass(frozen=True, slots=True)
class ThrottleDelta:
    periods: int
    throttled: int
    throttled_ns: int

    @property
    def pct(self) -> float:
        return 100.0 * self.throttled / self.periods if self.periods > 0 else 0.0


def throttle_delta(prev: CpuStat, cur: CpuStat) -> ThrottleDelta | None:
    """Growth between two readings; None when a counter went backwards (cgroup recreated)."""
    dp = cur.nr_periods - prev.nr_periods
    dt = cur.nr_throttled - prev.nr_throttled
    dn = cur.throttled_ns - prev.throttled_ns
    if dp < 0 or dt < 0 or dn < 0:
        return None
    return ThrottleDelta(dp, dt, dn)


@dataclass(slots=True)
class _QuotaCgroup:
    hierarchy: str  # "cpu" (v1) or "unified" (v2)
    path: str
    stat_file: Path
    quota_us: int
    period_us: int
    prev: CpuStat | None = None


# ---- run-queue aggregates ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunqTotals:
    waits: int
    wait_ns: int
    over: int
    throttled_waits: int
    throttled_ns: int
    slots: tuple[int, ...]

    @classmethod
    def zero(cls) -> RunqTotals:
        return cls(0, 0, 0, 0, 0, (0,) * RUNQ_SLOTS)

    def minus(self, prev: RunqTotals) -> RunqTotals:
        return RunqTotals(
            self.waits - prev.waits,
            self.wait_ns - prev.wait_ns,
            self.over - prev.over,
            self.throttled_waits - prev.throttled_waits,
            self.throttled_ns - prev.throttled_ns,
            tuple(a - b for a, b in zip(self.slots, prev.slots, strict=True)),
        )


def sum_runq_hist(raw: bytes) -> RunqTotals:
    """Sum a PERCPU_ARRAY lookup of ``struct runq_hist`` (every CPU's slot back to back)."""
    waits = wait_ns = over = tw = tn = 0
    slots = [0] * RUNQ_SLOTS
    for rec in RUNQ_HIST.iter_unpack(raw):
        waits += rec[0]
        wait_ns += rec[1]
        over += rec[2]
        tw += rec[3]
        tn += rec[4]
        for i in range(RUNQ_SLOTS):
            slots[i] += rec[5 + i]
    return RunqTotals(waits, wait_ns, over, tw, tn, tuple(slots))


def slot_upper_ns(slot: int) -> int:
    """Upper bound of histogram slot ``slot``: [2^i, 2^(i+1)) × 1024 ns."""
    return (1 << (slot + 1)) * 1024


def percentile_ns(slots: Sequence[int], q: float) -> int:
    """Upper bound of the slot holding the ``q`` quantile (coarse: log2 buckets)."""
    total = sum(slots)
    if total <= 0:
        return 0
    rank = q * total
    seen = 0
    for i, n in enumerate(slots):
        seen += n
        if seen >= rank:
            return slot_upper_ns(i)
    return slot_upper_ns(len(slots) - 1)


@dataclass(frozen=True, slots=True)
class WorstWait:
    max_ns: int
    cgroup_id: int
    timestamp_ns: int
    pid: int
    tid: int
    config_generation: int
    comm: str
    cpu: int


def worst_of(raw: bytes) -> WorstWait | None:
    """The longest wait over every CPU's ``struct runq_worst`` slot, None when all are empty."""
    best: WorstWait | None = None
    for cpu, rec in enumerate(RUNQ_WORST.iter_unpack(raw)):
        max_ns, cgid, ts, pid, tid, gen, comm = rec
        if max_ns and (best is None or max_ns > best.max_ns):
            text = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
            best = WorstWait(max_ns, cgid, ts, pid, tid, gen, text, cpu)
    return best


# ---- optional container attribution ----------------------------------------------------------

ParseContainer = Callable[[str], Any]


def _load_parse_container() -> ParseContainer | None:
    try:
        module = importlib.import_module("tapio.observers.attribution")
    except ImportError:
        return None
    fn = getattr(module, "parse_container", None)
    return fn if callable(fn) else None


def proc_cgroup_paths(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {"unified" | "cpu" | "memory": path}; {} when gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            out.setdefault("unified", parts[2])
        for name in parts[1].split(","):
            if name in ("cpu", "memory"):
                out.setdefault(name, parts[2])
    return out


# ---- the observer ------------------------------------------------------------------------------


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
        self._parse_container = _load_parse_container()
        # state
        self._mem_board = PressureBoard()
        self._cpu_board = PressureBoard()
        self._runq_edge = Hysteresis()
        self._runq_prev: RunqTotals | None = None
        self._throttle_edges: dict[tuple[str, str], Hysteresis] = {}
        self._quota: dict[tuple[str, str], _QuotaCgroup] = {}
        self._psi_cgroups: list[str] = []
        self._ipc_edge = Hysteresis()
        self._stall_edge = Hysteresis()
        self._triggers: TriggerSet | None = None
        self._triggers_armed_for: tuple[float, float] | None = None
        self._last_scan = -1e9
        self._config_epoch = 0

    # ---- lifecycle ---------------------------------------------------------------------
    def attach(self, obj: BpfObject) -> None:
        self._obj = obj
        for name in ("runq_hist", "runq_worst"):
            obj.map(name)  # fail early (BpfError) if the object is not ours
        obj.attach_all()
        self._pmu_available, self._pmu_detail = pmu_mod.probe()
        if not self._pmu_available:
            if "no_pmu" not in self.degraded_reasons:
                self.degraded_reasons.append("no_pmu")
            self._pmu_detail += (
                "; kernel.node.ipc_degradation and the counter-based cpu_stall are unsupported, "
                "memory_pressure and cpu_stall (PSI, run-queue latency, throttling) still work"
            )

    def capabilities(self) -> list[Capability]:
        caps = [*super().capabilities(), Capability("pmu", self._pmu_available, self._pmu_detail)]
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
        self._config_epoch += 1

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
        """Which cgroups to watch: cgroup2 dirs for PSI, cgroups with a CPU quota."""
        self._last_scan = time.monotonic()
        unified = self.roots.unified
        v2 = list(walk_cgroups(unified)) if unified is not None else []
        if unified is not None:
            v2 = [p for p in v2 if (unified / p.lstrip("/") / "memory.pressure").exists()]
        self._psi_cgroups = pick_cgroups(v2, MAX_CGROUPS)
        found: dict[tuple[str, str], tuple[Path, int, int]] = {}
        sources: list[
            tuple[str, Path, Sequence[str], Callable[[Path], tuple[int, int] | None]]
        ] = []
        if self.roots.cpu_v1 is not None:
            sources.append(
                ("cpu", self.roots.cpu_v1, list(walk_cgroups(self.roots.cpu_v1)), has_quota_v1)
            )
        if unified is not None:
            sources.append(("unified", unified, v2, has_quota_v2))
        for hierarchy, root, paths, probe in sources:
            for p in paths:
                if len(found) >= MAX_QUOTA_CGROUPS:
                    break
                d = root / p.lstrip("/")
                q = probe(d)
                if q is not None:
                    found[(hierarchy, p)] = (d / "cpu.stat", q[0], q[1])
        for key in [k for k in self._quota if k not in found]:
            del self._quota[key]
            self._throttle_edges.pop(key, None)
        for key, (stat, quota, period) in found.items():
            cur = self._quota.get(key)
            if cur is None:
                self._quota[key] = _QuotaCgroup(key[0], key[1], stat, quota, period)
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
        keys = [NODE, *self._psi_cgroups]
        wanted: dict[str, float] = {}
        for resource, pct in (("memory", want[0]), ("cpu", want[1])):
            for k in keys:
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
        for rep in self._mem_board.step(
            mem, memory_judge(u.memory_some_pct, u.memory_full_pct, u.hysteresis_pct)
        ):
            occ = self._psi_report("memory", rep, now_ns)
            if occ is not None:
                out.append(occ)
        for rep in self._cpu_board.step(cpu, cpu_judge(u.cpu_some_pct, u.hysteresis_pct)):
            occ = self._psi_report("cpu", rep, now_ns)
            if occ is not None:
                out.append(occ)
        return out

    def _target_facts(self, key: str) -> dict[str, object]:
        if key == NODE:
            return {"cgroup": NODE, "scope": "node"}
        facts: dict[str, object] = {"cgroup": key, "scope": "cgroup", "cgroup_hierarchy": "v2"}
        facts.update(self._container_facts(key))
        return facts

    def _container_facts(self, path: str) -> dict[str, object]:
        if self._parse_container is None:
            return {}
        try:
            attr = self._parse_container(path)
        except Exception:  # an attribution bug must not cost the evidence
            return {}
        facts: dict[str, object] = {}
        for name in ("container_id", "runtime", "pod_uid"):
            value = getattr(attr, name, None)
            if value:
                facts["container_runtime" if name == "runtime" else name] = value
        return facts

    def _psi_report(self, resource: str, rep: Report, now_ns: int) -> Occurrence | None:
        u = self.user
        target = "node" if rep.key == NODE else f"cgroup {rep.key}"
        if rep.transition is Transition.CLEAR:
            log.info(
                f"{resource} pressure cleared", target=target, some_avg10=rep.reading.some.avg10
            )
            return None
        r = rep.reading
        data: dict[str, object] = {
            "config_generation": self.kernel.generation,
            "hysteresis_pct": u.hysteresis_pct,
            "resource": resource,
            **self._target_facts(rep.key),
            **psi_facts(r),
        }
        if rep.covered:
            data["ancestors_in_pressure"] = list(rep.covered)
        if resource == "memory":
            full = r.full.avg10 if r.full is not None else 0.0
            data.update(threshold_some_pct=u.memory_some_pct, threshold_full_pct=u.memory_full_pct)
            return new_occurrence(
                NODE_MEMORY_PRESSURE,
                "warning",
                "in_progress",
                timestamp_ns=now_ns,
                code="MEMORY_PRESSURE",
                message=(
                    f"Memory pressure on {target} "
                    f"(some avg10={r.some.avg10:.2f}%, full avg10={full:.2f}%)"
                ),
                data=data,
            )
        data.update(signal="psi", threshold_some_pct=u.cpu_some_pct)
        severity: Severity = (
            "critical" if r.some.avg10 >= min(100.0, 2 * u.cpu_some_pct) else "warning"
        )
        return new_occurrence(
            NODE_CPU_STALL,
            severity,
            "in_progress",
            timestamp_ns=now_ns,
            code="CPU_STALL",
            message=f"CPU pressure on {target} (some avg10={r.some.avg10:.2f}%)",
            data=data,
        )

    async def _psi_loop(self, emit: Emit) -> None:
        while True:
            if self.enabled and time.monotonic() - self._last_scan >= RESCAN_SECS:
                self.rescan()
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
        p99 = percentile_ns(d.slots, 0.99)
        data: dict[str, object] = {
            "config_generation": self.kernel.generation,
            "signal": "runq_latency",
            "scope": "node",
            "threshold_ms": threshold / 1e6,
            "hysteresis_pct": h,
            "interval_ms": TICK_SECS * 1000,
            "waits": d.waits,
            "waits_over_threshold": d.over,
            "avg_wait_ms": round(d.wait_ns / d.waits / 1e6, 3) if d.waits else 0.0,
            "p99_wait_ms_upper_bound": round(p99 / 1e6, 3),
            "max_wait_ms": round(max_ns / 1e6, 3),
            "throttled_waits_excluded": d.throttled_waits,
        }
        if worst is not None:
            data.update(
                worst_pid=worst.pid,
                worst_tid=worst.tid,
                worst_comm=worst.comm,
                worst_cpu=worst.cpu,
                worst_cgroup_id=worst.cgroup_id,
            )
            paths = proc_cgroup_paths(worst.pid)
            if "cpu" in paths:
                data["worst_cgroup"] = paths["cpu"]
            elif "unified" in paths:
                data["worst_cgroup"] = paths["unified"]
            if "worst_cgroup" in data:
                data.update(self._container_facts(str(data["worst_cgroup"])))
        critical = max_ns >= 4 * threshold
        return new_occurrence(
            NODE_CPU_STALL,
            "critical" if critical else "warning",
            "in_progress",
            timestamp_ns=now_ns,
            code="CPU_STALL",
            message=(
                f"Run-queue latency max {max_ns / 1e6:.1f}ms "
                f"({d.over} waits ≥ {threshold / 1e6:g}ms in {TICK_SECS:g}s)"
            ),
            data=data,
        )

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
                continue
            if tr is not Transition.START:
                continue
            q = self._quota.get(key)
            data: dict[str, object] = {
                "config_generation": self.kernel.generation,
                "signal": "throttling",
                "scope": "cgroup",
                "cgroup": path,
                "cgroup_hierarchy": "v1" if hierarchy == "cpu" else "v2",
                "threshold_pct": u.throttle_pct,
                "hysteresis_pct": u.hysteresis_pct,
                "throttled_pct": round(d.pct, 2),
                "nr_periods_delta": d.periods,
                "nr_throttled_delta": d.throttled,
                "throttled_ms_delta": round(d.throttled_ns / 1e6, 3),
                "interval_ms": TICK_SECS * 1000,
            }
            if q is not None:
                data.update(quota_us=q.quota_us, period_us=q.period_us)
            data.update(self._container_facts(path))
            out.append(
                new_occurrence(
                    NODE_CPU_STALL,
                    "critical" if d.pct >= min(100.0, 2 * u.throttle_pct) else "warning",
                    "in_progress",
                    timestamp_ns=now_ns,
                    code="CPU_STALL",
                    message=(
                        f"CPU throttling of cgroup {path}: {d.pct:.0f}% of "
                        f"{d.periods} periods throttled"
                    ),
                    data=data,
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
                if "no_pmu" not in self.degraded_reasons:
                    self.degraded_reasons.append("no_pmu")
                log.warning("hardware counters unavailable", detail=self._pmu_detail)
                return []
        cur = self._pmu.read()
        prev, self._pmu_prev = self._pmu_prev, cur
        if prev is None:
            return []
        sample = pmu_mod.interval_sample(prev, cur)
        return self.judge_pmu(sample, now_ns)

    def judge_pmu(self, sample: pmu_mod.IntervalSample | None, now_ns: int) -> list[Occurrence]:
        """IPC and stall share of one interval (edge-triggered, hysteresis as everywhere)."""
        if sample is None or sample.cycles < PMU_MIN_CYCLES or not self.enabled:
            return []
        u = self.user
        out: list[Occurrence] = []
        ipc = sample.ipc
        stall = sample.stall_pct
        data: dict[str, object] = {
            "config_generation": self.kernel.generation,
            "scope": "node",
            "cpus": sample.cpus,
            "cycles": int(sample.cycles),
            "instructions": int(sample.instructions),
            "ipc": round(ipc, 4),
            "interval_ms": TICK_SECS * 1000,
            "hysteresis_pct": u.hysteresis_pct,
        }
        if stall is not None and sample.stall_cycles is not None:
            data.update(stall_cycles=int(sample.stall_cycles), stall_pct=round(stall, 2))
        tr = self._ipc_edge.step(*below(ipc, u.ipc_degradation, u.hysteresis_pct))
        if tr is Transition.START:
            out.append(
                new_occurrence(
                    NODE_IPC_DEGRADATION,
                    "warning",
                    "in_progress",
                    timestamp_ns=now_ns,
                    code="IPC_DEGRADATION",
                    message=f"Node low IPC {ipc:.2f}"
                    + (f" (stall {stall:.1f}%)" if stall is not None else ""),
                    data={**data, "threshold_ipc": u.ipc_degradation},
                )
            )
        if stall is not None:
            tr = self._stall_edge.step(*above(stall, u.stall_pct_warning, u.hysteresis_pct))
            if tr is Transition.START:
                severity: Severity = "critical" if stall >= u.stall_pct_critical else "warning"
                out.append(
                    new_occurrence(
                        NODE_CPU_STALL,
                        severity,
                        "in_progress",
                        timestamp_ns=now_ns,
                        code="CPU_STALL",
                        message=f"Node CPU stall {stall:.1f}% (ipc={ipc:.2f})",
                        data={
                            **data,
                            "signal": "pmu",
                            "threshold_pct": u.stall_pct_warning,
                            "critical_pct": u.stall_pct_critical,
                        },
                    )
                )
        return out
