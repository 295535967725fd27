"""Hardware-counter math with synthetic readings: per-interval deltas, multiplexing scaling,
edge-triggered IPC/stall judgement, and the no-PMU capability path."""

from __future__ import annotations

import struct

import pytest

from tapio.bpf.abi import FLAG_NODE, TapioConfig
from tapio.observers.base import ObserverContext, UserThresholds
from tapio.observers.cgroups import CgroupRoots
from tapio.observers.node import NodeObserver, pmu
from tapio.observers.node.pmu import IntervalSample, Reading, interval_sample, scaled_delta
from tapio.occurrence import NODE_CPU_STALL, NODE_IPC_DEGRADATION


def r(value: int, enabled: int, running: int) -> Reading:
    return Reading(value, enabled, running)


def test_reading_decode() -> None:
    assert Reading.decode(struct.pack("<QQQ", 5, 6, 7)) == r(5, 6, 7)


def test_scaled_delta_is_per_interval_not_lifetime() -> None:
    # fully scheduled counter: the plain difference
    assert scaled_delta(r(1_000, 100, 100), r(1_500, 200, 200)) == 500.0


def test_scaled_delta_extrapolates_multiplexed_intervals() -> None:
    # ran 25 of 100 ns of the interval: 300 counted -> 1200 estimated
    assert scaled_delta(r(1_000, 1_000, 800), r(1_300, 1_100, 825)) == pytest.approx(1_200.0)
    # lifetime ratio would give (1300 * 1100/825) - ... ; the interval ratio is what we want
    assert scaled_delta(r(0, 0, 0), r(100, 100, 50)) == 200.0


@pytest.mark.parametrize(
    ("prev", "cur"),
    [
        (r(10, 10, 10), r(20, 20, 10)),  # never ran in the interval
        (r(10, 10, 10), r(5, 20, 20)),  # went backwards (reset)
    ],
)
def test_scaled_delta_undefined(prev: Reading, cur: Reading) -> None:
    assert scaled_delta(prev, cur) is None


def test_interval_sample_sums_cpus_and_skips_undefined() -> None:
    prev = [
        (r(0, 0, 0), r(0, 0, 0), r(0, 0, 0)),
        (r(0, 0, 0), r(0, 0, 0), None),
        None,
    ]
    cur = [
        (r(1_000, 10, 10), r(500, 10, 10), r(300, 10, 10)),
        (r(1_000, 10, 5), r(2_000, 10, 5), None),  # multiplexed: x2
        (r(9, 9, 9), r(9, 9, 9), None),  # no previous reading
    ]
    s = interval_sample(prev, cur)
    assert s is not None
    assert (s.cycles, s.instructions, s.cpus) == (3_000.0, 4_500.0, 2)
    assert s.stall_cycles is None  # CPU 1 has no stall counter: no node-wide stall share
    assert s.ipc == 1.5 and s.stall_pct is None
    only0 = interval_sample(prev[:1], cur[:1])
    assert only0 is not None and only0.stall_pct == 30.0
    assert interval_sample([None], [None]) is None


def test_perf_attr_layout() -> None:
    attr = pmu.perf_attr(pmu.PERF_COUNT_HW_INSTRUCTIONS)
    assert len(attr) == pmu.PERF_ATTR_SIZE == 136
    type_, size, config = struct.unpack_from("<IIQ", attr, 0)
    assert (type_, size, config) == (0, 136, 1)
    assert struct.unpack_from("<Q", attr, 32)[0] == 3  # TOTAL_TIME_ENABLED | RUNNING
    assert struct.unpack_from("<Q", attr, 40)[0] == 1 << 6  # exclude_hv, enabled, counting


def test_parse_cpulist() -> None:
    assert pmu.parse_cpulist("0-3,5,7-8\n") == [0, 1, 2, 3, 5, 7, 8]
    assert pmu.parse_cpulist("0") == [0]
    assert len(pmu.parse_cpulist("0-5000")) == pmu.MAX_CPUS


def test_probe_reports_a_reason() -> None:
    ok, detail = pmu.probe()
    assert isinstance(ok, bool) and detail
    if not ok:
        assert "perf_event_open" in detail


def _observer(**user: object) -> NodeObserver:
    obs = NodeObserver(ObserverContext(boot_offset_ns=0), roots=CgroupRoots())
    obs.on_config(
        TapioConfig(generation=2, flags=FLAG_NODE),
        UserThresholds(**user),  # type: ignore[arg-type]
    )
    return obs


def sample(ipc: float, stall_pct: float | None, cycles: float = 1e9) -> IntervalSample:
    stalls = cycles * stall_pct / 100 if stall_pct is not None else None
    return IntervalSample(cycles, cycles * ipc, stalls, 2)


def test_ipc_degradation_edge_triggered() -> None:
    obs = _observer(ipc_degradation=1.0, hysteresis_pct=50.0)
    fired = [obs.judge_pmu(sample(ipc, None), 0) for ipc in (1.4, 0.6, 0.5, 1.2, 1.6, 0.7)]
    kinds = [[o.type for o in batch] for batch in fired]
    assert kinds == [[], [NODE_IPC_DEGRADATION], [], [], [], [NODE_IPC_DEGRADATION]]
    occ = fired[1][0]
    assert occ.error is not None and occ.error.code == "IPC_DEGRADATION"
    assert occ.data is not None and occ.data["ipc"] == 0.6 and occ.data["cpus"] == 2


def test_counter_stall_severity_and_dedup() -> None:
    obs = _observer(stall_pct_warning=20.0, stall_pct_critical=40.0, ipc_degradation=0.1)
    out = obs.judge_pmu(sample(1.0, 45.0), 0)
    assert [(o.type, o.severity) for o in out] == [(NODE_CPU_STALL, "critical")]
    assert out[0].data is not None and out[0].data["signal"] == "pmu"
    assert out[0].data["stall_pct"] == 45.0
    assert obs.judge_pmu(sample(1.0, 30.0), 0) == []  # still active
    assert obs.judge_pmu(sample(1.0, 5.0), 0) == []  # clears
    out = obs.judge_pmu(sample(1.0, 25.0), 0)
    assert [(o.type, o.severity) for o in out] == [(NODE_CPU_STALL, "warning")]


def test_idle_intervals_are_not_judged() -> None:
    obs = _observer(ipc_degradation=1.0)
    assert obs.judge_pmu(sample(0.1, 90.0, cycles=1_000), 0) == []
    assert obs.judge_pmu(None, 0) == []


def test_no_pmu_is_a_capability_and_a_degraded_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeObj:
        programs: dict[str, object] = {}  # noqa: RUF012 - no run-queue hook loaded
        attached: set[str] = set()  # noqa: RUF012

        def map(self, name: str) -> object:
            return object()

        def attach_all(self) -> None:
            pass

    monkeypatch.setattr(pmu, "probe", lambda: (False, "no hardware PMU: ENOENT"))
    obs = _observer()
    obs.attach(FakeObj())  # type: ignore[arg-type]
    caps = {c.name: c for c in obs.capabilities()}
    assert caps["pmu"].available is False
    assert "ipc_degradation" in caps["pmu"].detail and "ENOENT" in caps["pmu"].detail
    assert obs.degraded_reasons == ["no_pmu"]
    obs.attach(FakeObj())  # type: ignore[arg-type]
    assert obs.degraded_reasons == ["no_pmu"]  # said once
    assert obs.tick_pmu(0) == []  # and nothing is opened or judged
