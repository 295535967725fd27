"""Node observer userspace: run-queue decoding/judging, throttling deltas, config gating,
cgroup discovery and the occurrences it builds."""

from __future__ import annotations

import importlib
import struct
from pathlib import Path

import msgspec
import pytest

from tapio.bpf.abi import FLAG_NETWORK, FLAG_NODE, TAPIO_CONFIG_ABI_VERSION, TapioConfig
from tapio.observers import REGISTRY, observer_class
from tapio.observers.base import ObserverContext, UserThresholds
from tapio.observers.cgroups import CgroupRoots
from tapio.observers.node import NodeObserver
from tapio.observers.node.discovery import pick_cgroups
from tapio.observers.node.psi import NODE, PsiLine, PsiReading
from tapio.observers.node.runq import (
    RUNQ_HIST,
    RUNQ_SLOTS,
    RUNQ_WORST,
    RunqTotals,
    WorstWait,
    percentile_ns,
    slot_upper_ns,
    sum_runq_hist,
    worst_of,
)
from tapio.observers.node.throttle import CpuStat, ThrottleDelta, parse_cpu_stat, throttle_delta
from tapio.occurrence import NODE_CPU_STALL, NODE_MEMORY_PRESSURE, Occurrence

from ..test_lean import declared_maps

MS = 1_000_000


def make_observer(
    tmp_path: Path | None = None,
    *,
    runq_ms: int = 10,
    flags: int = FLAG_NODE,
    abi: int = TAPIO_CONFIG_ABI_VERSION,
    **user: object,
) -> NodeObserver:
    roots = CgroupRoots(
        unified=tmp_path / "unified" if tmp_path else None,
        cpu=tmp_path / "cpu" if tmp_path else None,
    )
    obs = NodeObserver(ObserverContext(boot_offset_ns=0), roots=roots)
    obs.on_config(
        TapioConfig(
            abi_version=abi, generation=4, flags=flags, runq_latency_threshold_ns=runq_ms * MS
        ),
        msgspec.convert(user, UserThresholds) if user else UserThresholds(),
    )
    return obs


def hist_bytes(*cpus: tuple[int, int, int, int, int, list[int]]) -> bytes:
    out = b""
    for waits, wait_ns, over, tw, tn, slots in cpus:
        out += RUNQ_HIST.struct.pack(
            waits, wait_ns, over, tw, tn, *(slots + [0] * (RUNQ_SLOTS - len(slots)))
        )
    return out


def totals(waits: int, over: int, wait_ns: int = 0, slots: list[int] | None = None) -> RunqTotals:
    s = (slots or []) + [0] * (RUNQ_SLOTS - len(slots or []))
    return RunqTotals(waits, wait_ns, over, 0, 0, tuple(s))


def worst(ms: float, pid: int = 42) -> WorstWait:
    return WorstWait(int(ms * MS), 1, 0, pid, pid, 4, "busy", 0)


def test_registered() -> None:
    module, _, attr = REGISTRY["node"].partition(":")
    assert getattr(importlib.import_module(module), attr) is NodeObserver
    assert observer_class("node") is NodeObserver
    assert NodeObserver.ring_map is None


# ---- run-queue aggregates ---------------------------------------------------------------------


def test_sum_runq_hist_adds_every_cpu() -> None:
    raw = hist_bytes((10, 100, 1, 2, 50, [1, 2, 3]), (5, 50, 2, 0, 0, [0, 0, 0, 4]))
    t = sum_runq_hist(raw)
    assert (t.waits, t.wait_ns, t.over, t.throttled_waits, t.throttled_ns) == (15, 150, 3, 2, 50)
    assert t.slots[:4] == (1, 2, 3, 4) and sum(t.slots) == 10


def test_runq_totals_minus() -> None:
    a = totals(10, 2, 100, [1, 1])
    b = totals(25, 7, 400, [3, 4])
    d = b.minus(a)
    assert (d.waits, d.over, d.wait_ns, d.slots[:2]) == (15, 5, 300, (2, 3))


def test_percentile_from_log2_slots() -> None:
    assert slot_upper_ns(0) == 2048
    assert slot_upper_ns(14) == (1 << 15) * 1024  # ~33.5 ms
    slots = [0] * RUNQ_SLOTS
    slots[3] = 98
    slots[14] = 2
    assert percentile_ns(slots, 0.5) == slot_upper_ns(3)
    assert percentile_ns(slots, 0.99) == slot_upper_ns(14)
    assert percentile_ns([0] * RUNQ_SLOTS, 0.99) == 0


def test_worst_of_picks_the_longest_wait_over_cpus() -> None:
    raw = RUNQ_WORST.struct.pack(5 * MS, 1, 111, 10, 11, 4, b"a\0") + RUNQ_WORST.struct.pack(
        40 * MS, 77, 222, 20, 21, 4, b"busy-loop\0\0"
    )
    w = worst_of(raw)
    assert w is not None
    assert (w.max_ns, w.cgroup_id, w.pid, w.tid, w.comm, w.cpu) == (
        40 * MS,
        77,
        20,
        21,
        "busy-loop",
        1,
    )
    assert worst_of(bytes(2 * RUNQ_WORST.size)) is None


def test_runq_is_edge_triggered_with_hysteresis() -> None:
    obs = make_observer(runq_ms=10)
    seq = [
        (totals(0, 0), None),  # first read: baseline only
        (totals(100, 2), worst(30)),  # 2 over < RUNQ_MIN_OVER: not yet
        (totals(200, 10), worst(30)),  # starts
        (totals(300, 20), worst(40)),  # lasts: nothing
        (totals(400, 20), worst(6)),  # 6 ms >= 10 * 50 %: still active
        (totals(500, 20), worst(2)),  # clears
        (totals(600, 30), worst(25)),  # starts again
    ]
    out = [obs.judge_runq(t, w, 1_000) for t, w in seq]
    fired = [i for i, o in enumerate(out) if o is not None]
    assert fired == [2, 6]
    occ = out[2]
    assert occ is not None and occ.type == NODE_CPU_STALL and occ.error is not None
    assert occ.error.code == "CPU_STALL" and occ.outcome == "in_progress"
    assert occ.severity == "warning"
    assert occ.data is not None
    assert occ.data["signal"] == "runq_latency"
    assert occ.data["waits_over_threshold"] == 8
    assert occ.data["waits"] == 100
    assert occ.data["max_wait_ms"] == 30.0
    assert occ.data["threshold_ms"] == 10.0
    assert occ.data["worst_pid"] == 42 and occ.data["worst_comm"] == "busy"
    assert list(occ.data) == sorted(occ.data)


def test_runq_critical_when_far_over_threshold() -> None:
    obs = make_observer(runq_ms=10)
    obs.judge_runq(totals(0, 0), None, 0)
    occ = obs.judge_runq(totals(50, 5), worst(45), 0)
    assert occ is not None and occ.severity == "critical"


def test_runq_silent_when_threshold_is_zero() -> None:
    obs = make_observer(runq_ms=0)
    assert obs.judge_runq(totals(0, 0), None, 0) is None
    assert obs.judge_runq(totals(100, 100), worst(500), 0) is None


# ---- config gating ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("abi", "flags"), [(0, 0), (0, FLAG_NODE), (2, FLAG_NODE), (3, FLAG_NETWORK)]
)
def test_inert_or_foreign_config_emits_nothing(abi: int, flags: int) -> None:
    obs = make_observer(abi=abi, flags=flags)
    assert not obs.enabled
    hot = {NODE: PsiReading(PsiLine(90.0), PsiLine(80.0))}
    assert obs.judge_psi(hot, hot, 0) == []
    obs.judge_runq(totals(0, 0), None, 0)
    assert obs.judge_runq(totals(100, 100), worst(500), 0) is None
    assert obs.judge_throttling({("cpu", "/x"): ThrottleDelta(10, 10, 10**9)}, 0) == []


def test_disabling_resets_state_so_reenabling_reports_again() -> None:
    obs = make_observer()
    hot = {NODE: PsiReading(PsiLine(90.0), PsiLine(80.0))}
    assert len(obs.judge_psi(hot, {}, 0)) == 1
    assert obs.judge_psi(hot, {}, 0) == []
    obs.on_config(TapioConfig(abi_version=0), UserThresholds())
    obs.on_config(TapioConfig(generation=5, flags=FLAG_NODE), UserThresholds())
    assert len(obs.judge_psi(hot, {}, 0)) == 1


# ---- PSI occurrences --------------------------------------------------------------------------


def test_memory_pressure_occurrence_names_the_cgroup() -> None:
    obs = make_observer()
    readings = {
        NODE: PsiReading(PsiLine(30.0, 10.0, 2.0, 999), PsiLine(20.0)),
        "/kubepods/pod0/" + "a" * 64: PsiReading(PsiLine(28.0, 9.0, 1.0, 888), PsiLine(19.0)),
    }
    out: list[Occurrence] = obs.judge_psi(readings, {}, 1_700_000_000_000_000_000)
    assert len(out) == 1
    occ = out[0]
    assert occ.type == NODE_MEMORY_PRESSURE and occ.severity == "warning"
    assert occ.outcome == "in_progress"
    assert occ.error is not None and occ.error.code == "MEMORY_PRESSURE"
    assert occ.data is not None
    assert occ.data["cgroup"] == "/kubepods/pod0/" + "a" * 64
    assert occ.data["scope"] == "cgroup"
    assert occ.data["some_avg10"] == 28.0 and occ.data["some_total_us"] == 888
    assert occ.data["full_avg10"] == 19.0
    assert occ.data["ancestors_in_pressure"] == [NODE]
    assert occ.data["config_generation"] == 4
    # later rounds: nothing
    assert obs.judge_psi(readings, {}, 0) == []


def test_cpu_psi_occurrence() -> None:
    obs = make_observer(cpu_some_pct=40.0)
    out = obs.judge_psi({}, {NODE: PsiReading(PsiLine(45.0))}, 0)
    assert len(out) == 1 and out[0].type == NODE_CPU_STALL
    assert out[0].data is not None
    assert out[0].data["signal"] == "psi" and out[0].data["cgroup"] == "node"
    assert out[0].severity == "warning"
    out = make_observer(cpu_some_pct=40.0).judge_psi({}, {NODE: PsiReading(PsiLine(85.0))}, 0)
    assert out[0].severity == "critical"


# ---- throttling -------------------------------------------------------------------------------

V1_STAT = "nr_periods 120\nnr_throttled 100\nthrottled_time 8500000000\nnr_bursts 0\nburst_time 0\n"
V2_STAT = (
    "usage_usec 1000\nuser_usec 900\nsystem_usec 100\nnr_periods 50\nnr_throttled 5\n"
    "throttled_usec 250000\nnr_bursts 0\nburst_usec 0\n"
)


def test_parse_cpu_stat_v1_v2_and_without_bandwidth() -> None:
    assert parse_cpu_stat(V1_STAT) == CpuStat(120, 100, 8_500_000_000)
    assert parse_cpu_stat(V2_STAT) == CpuStat(50, 5, 250_000_000)
    assert parse_cpu_stat("usage_usec 5\nuser_usec 3\nsystem_usec 2\n") is None


def test_throttle_delta_and_pct() -> None:
    d = throttle_delta(CpuStat(100, 10, 1_000), CpuStat(110, 19, 91_000))
    assert d == ThrottleDelta(10, 9, 90_000) and d.pct == 90.0
    assert throttle_delta(CpuStat(100, 10, 0), CpuStat(5, 1, 0)) is None  # recreated cgroup
    assert ThrottleDelta(0, 0, 0).pct == 0.0


def _quota_tree(tmp_path: Path, quota: int = 10000) -> Path:
    cg = tmp_path / "cpu" / "job"
    cg.mkdir(parents=True)
    (cg / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cg / "cpu.cfs_period_us").write_text("100000\n")
    (cg / "cpu.stat").write_text("nr_periods 0\nnr_throttled 0\nthrottled_time 0\n")
    free = tmp_path / "cpu" / "free"
    free.mkdir()
    (free / "cpu.cfs_quota_us").write_text("-1\n")
    (free / "cpu.cfs_period_us").write_text("100000\n")
    v2 = tmp_path / "unified" / "svc"
    v2.mkdir(parents=True)
    (v2 / "memory.pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    (v2 / "cpu.max").write_text("50000 100000\n")
    (v2 / "cpu.stat").write_text(V2_STAT)
    return cg


def test_rescan_finds_quota_cgroups_and_psi_dirs(tmp_path: Path) -> None:
    _quota_tree(tmp_path)
    obs = make_observer(tmp_path)
    obs.rescan()
    assert sorted(obs.throttle.quota) == [("cpu", "/job"), ("unified", "/svc")]
    assert obs.psi.cgroups == ["/svc"]
    assert obs.throttle.quota[("cpu", "/job")].quota_us == 10000


def test_throttling_edge_from_cpu_stat_files(tmp_path: Path) -> None:
    cg = _quota_tree(tmp_path)
    obs = make_observer(tmp_path, throttle_pct=20.0, hysteresis_pct=50.0)
    obs.rescan()
    stat = cg / "cpu.stat"

    def tick(periods: int, throttled: int, ns: int) -> list[Occurrence]:
        stat.write_text(f"nr_periods {periods}\nnr_throttled {throttled}\nthrottled_time {ns}\n")
        deltas = {k: v for k, v in obs.read_throttling().items() if k == ("cpu", "/job")}
        return obs.judge_throttling(deltas, 0)

    assert tick(0, 0, 0) == []  # baseline
    assert tick(10, 1, 80 * MS) == []  # 10 %
    out = tick(20, 10, 800 * MS)  # 90 % of 10 periods
    assert len(out) == 1
    data = out[0].data
    assert data is not None
    assert data["signal"] == "throttling" and data["cgroup"] == "/job"
    assert data["cgroup_hierarchy"] == "v1" and data["throttled_pct"] == 90.0
    assert data["nr_periods_delta"] == 10 and data["throttled_ms_delta"] == 720.0
    assert data["quota_us"] == 10000 and data["period_us"] == 100000
    assert out[0].severity == "critical"
    assert tick(30, 19, 1500 * MS) == []  # lasts
    assert tick(40, 20, 1510 * MS) == []  # 10 % = clear level (< 10 clears, not yet)
    assert tick(50, 20, 1510 * MS) == []  # 0 %: clears silently
    assert len(tick(60, 28, 2000 * MS)) == 1  # new incident
    assert tick(62, 30, 2100 * MS) == []  # too few periods to judge


def test_throttling_state_dropped_when_cgroup_disappears(tmp_path: Path) -> None:
    cg = _quota_tree(tmp_path)
    obs = make_observer(tmp_path)
    obs.rescan()
    (cg / "cpu.cfs_quota_us").write_text("-1\n")
    obs.rescan()
    assert ("cpu", "/job") not in obs.throttle.quota


# ---- discovery --------------------------------------------------------------------------------


def test_pick_cgroups_prefers_containers_and_caps() -> None:
    paths = ["/system.slice", "/user.slice", "/kubepods", "/kubepods/pod1/" + "b" * 64, "/x"]
    assert pick_cgroups(paths, 3) == ["/kubepods", "/kubepods/pod1/" + "b" * 64, "/system.slice"]


def test_layouts_are_struct_sized() -> None:
    """The mirrors have the size of the map values the compiled node object declares."""
    obj = Path(__file__).resolve().parents[3] / "src/tapio/bpf/objects/node.bpf.o"
    if not obj.is_file():
        pytest.skip("node.bpf.o is not built (run `python build_bpf.py`)")
    sizes = {m.name: m.value_size for m in declared_maps(obj)}
    assert (RUNQ_HIST.size, RUNQ_WORST.size) == (sizes["runq_hist"], sizes["runq_worst"])
    assert struct.calcsize("<5Q24Q") == RUNQ_HIST.size
