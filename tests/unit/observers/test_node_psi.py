"""PSI parsing, triggers, the hysteresis state machine and the per-tree reporting board."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tapio.observers.node.board import (
    Hysteresis,
    PressureBoard,
    Transition,
    above,
    below,
    cpu_judge,
    is_ancestor,
    memory_judge,
)
from tapio.observers.node.judges import psi_facts
from tapio.observers.node.psi import (
    NODE,
    PsiLine,
    PsiReading,
    TriggerSet,
    parse_psi,
    read_psi,
    trigger_spec,
)

MEM = """some avg10=12.50 avg60=3.10 avg300=0.70 total=123456
full avg10=4.00 avg60=1.00 avg300=0.20 total=65432
"""


def reading(some: float, full: float | None = None) -> PsiReading:
    return PsiReading(PsiLine(some), PsiLine(full) if full is not None else None)


def test_parse_psi_some_and_full() -> None:
    r = parse_psi(MEM)
    assert r.some == PsiLine(12.5, 3.1, 0.7, 123456)
    assert r.full == PsiLine(4.0, 1.0, 0.2, 65432)


def test_parse_psi_without_full_line() -> None:
    r = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert r.full is None and r.some.total_us == 0


@pytest.mark.parametrize("text", ["", "full avg10=1 avg60=1 avg300=1 total=1", "some avg10=x"])
def test_parse_psi_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_psi(text)


def test_read_psi_file_and_missing(tmp_path: Path) -> None:
    f = tmp_path / "memory.pressure"
    f.write_text(MEM)
    assert read_psi(str(f)) == parse_psi(MEM)
    assert read_psi(str(tmp_path / "gone" / "memory.pressure")) is None
    (tmp_path / "bad").write_text("garbage")
    assert read_psi(str(tmp_path / "bad")) is None


def test_read_psi_real_node_file() -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("kernel without PSI")
    r = read_psi("/proc/pressure/memory")
    assert r is not None and r.full is not None and 0.0 <= r.some.avg10 <= 100.0


def test_psi_facts_keys() -> None:
    facts = psi_facts(parse_psi(MEM))
    assert facts["some_avg10"] == 12.5 and facts["full_total_us"] == 65432
    assert "full_avg10" not in psi_facts(reading(1.0))


def test_trigger_spec_scales_threshold_to_window() -> None:
    assert trigger_spec(15.0, 1_000_000) == b"some 150000 1000000"
    assert trigger_spec(10.0, 2_000_000) == b"some 200000 2000000"
    # stall must stay strictly inside the window
    assert trigger_spec(100.0, 2_000_000) == b"some 1999999 2000000"
    assert trigger_spec(0.00001, 2_000_000) == b"some 1 2000000"


def test_trigger_set_refuses_what_cannot_be_armed(tmp_path: Path) -> None:
    regular = tmp_path / "memory.pressure"
    regular.write_text(MEM)
    ts = TriggerSet(max_triggers=2)
    try:
        # A regular file accepts the write but cannot be polled for POLLPRI: not armed.
        assert ts.arm(str(regular), 10.0) is False
        assert str(regular) in ts.failures
        assert ts.arm(str(tmp_path / "missing"), 10.0) is False
        assert ts.failures[str(tmp_path / "missing")] == "ENOENT"
        assert ts.paths == set() and ts.fired() == set()
    finally:
        ts.close()


def test_trigger_set_arms_a_cgroup_pressure_file_when_possible() -> None:
    root = Path("/sys/fs/cgroup/unified")
    if not (root / "memory.pressure").exists():
        root = Path("/sys/fs/cgroup")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        pytest.skip("needs root and a cgroup2 mount")
    d = root / f"tapio-unit-{os.getpid()}"
    try:
        d.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup2 dir: {exc}")
    ts = TriggerSet(max_triggers=1)
    try:
        assert ts.arm(str(d / "memory.pressure"), 10.0) is True
        assert ts.arm(str(d / "cpu.pressure"), 10.0) is False  # bounded
        assert ts.paths == {str(d / "memory.pressure")}
        assert ts.fired() == set()  # an idle cgroup never fires
        ts.disarm(str(d / "memory.pressure"))
        assert ts.paths == set()
    finally:
        ts.close()
        d.rmdir()


# ---- hysteresis -------------------------------------------------------------------------------


def test_hysteresis_one_start_one_clear() -> None:
    h = Hysteresis()
    seq = [5, 12, 15, 9, 6, 12, 4.9, 3, 11]
    out = [h.step(*above(v, 10.0, 50.0)) for v in seq]
    assert out == [
        None,
        Transition.START,
        None,
        None,  # 9 < 10 but >= 5: still active
        None,
        None,  # back over 10 while active: no new start
        Transition.CLEAR,  # under 10 * 50%
        None,
        Transition.START,
    ]


def test_above_disabled_threshold_never_starts() -> None:
    assert above(1000.0, 0.0, 50.0) == (False, True)


def test_below_mirrors_above_for_low_is_bad_values() -> None:
    h = Hysteresis()
    out = [h.step(*below(v, 1.0, 50.0)) for v in (1.2, 0.8, 0.9, 1.2, 1.5, 0.5)]
    assert out == [None, Transition.START, None, None, Transition.CLEAR, Transition.START]


def test_hysteresis_pct_is_clamped() -> None:
    assert above(9.99, 10.0, 500.0) == (False, True)  # 100 %: clears right under the threshold
    assert above(0.2, 10.0, 0.0) == (False, False)  # floor 1 %: clear level is 0.1
    assert above(0.09, 10.0, 0.0) == (False, True)


# ---- the board --------------------------------------------------------------------------------

JUDGE = memory_judge(10.0, 5.0, 50.0)


def test_is_ancestor() -> None:
    assert is_ancestor(NODE, "/a")
    assert is_ancestor("/a", "/a/b")
    assert not is_ancestor("/a", "/ab")
    assert not is_ancestor("/a/b", "/a")
    assert not is_ancestor("/a", NODE)
    assert not is_ancestor("/a", "/a")


def test_board_reports_the_cgroup_once_not_its_ancestors() -> None:
    board = PressureBoard(max_defer=3)
    # Round 1: the node crosses first (node some >= any cgroup's), the cgroup is rising.
    r1 = board.step({NODE: reading(12.0, 1.0), "/pod": reading(8.0, 1.0)}, JUDGE)
    assert r1 == []  # deferred: a descendant may be the real source
    # Round 2: the cgroup crosses too; one report, naming it, with the node folded in.
    r2 = board.step({NODE: reading(20.0), "/pod": reading(15.0)}, JUDGE)
    assert [(r.key, r.transition) for r in r2] == [("/pod", Transition.START)]
    assert r2[0].covered == (NODE,)
    # While it lasts: nothing.
    for _ in range(5):
        assert board.step({NODE: reading(30.0), "/pod": reading(30.0)}, JUDGE) == []
    # The cgroup clears (reported before): one CLEAR; the covered node clears silently.
    r3 = board.step({NODE: reading(1.0), "/pod": reading(1.0)}, JUDGE)
    assert [(r.key, r.transition) for r in r3] == [("/pod", Transition.CLEAR)]
    assert board.active() == set()


def test_board_reports_the_node_when_no_cgroup_explains_it() -> None:
    board = PressureBoard(max_defer=2)
    rounds = [board.step({NODE: reading(15.0), "/a": reading(6.0)}, JUDGE) for _ in range(3)]
    assert rounds[0] == [] and rounds[1] == []  # waits max_defer rounds for /a
    assert [(r.key, r.transition) for r in rounds[2]] == [(NODE, Transition.START)]
    # Idle descendants do not delay the node at all.
    board = PressureBoard(max_defer=2)
    r = board.step({NODE: reading(15.0), "/a": reading(0.0)}, JUDGE)
    assert [x.key for x in r] == [NODE]


def totals(some: float, some_us: int, full_us: int) -> PsiReading:
    return PsiReading(PsiLine(some, total_us=some_us), PsiLine(0.0, total_us=full_us))


def test_board_waits_for_a_cgroup_whose_stall_grows_before_its_average_does() -> None:
    # The node's 2 s average window closed first; the cgroup's still shows the previous one,
    # but its stall total grew by 60 % of the last second: it is the source, about to cross.
    board = PressureBoard(max_defer=3)
    assert board.step({NODE: totals(0.0, 0, 0), "/pod": totals(0.0, 0, 0)}, JUDGE, now=10.0) == []
    r1 = board.step(
        {NODE: totals(12.0, 700_000, 0), "/pod": totals(0.0, 600_000, 0)}, JUDGE, now=11.0
    )
    assert r1 == []  # deferred on the cgroup's rate, not on its (stale) average
    r2 = board.step(
        {NODE: totals(20.0, 1_400_000, 0), "/pod": totals(15.0, 1_200_000, 0)}, JUDGE, now=12.0
    )
    assert [(r.key, r.covered) for r in r2] == [("/pod", (NODE,))]


def test_board_does_not_wait_for_a_cgroup_whose_stall_does_not_grow() -> None:
    board = PressureBoard(max_defer=3)
    board.step({NODE: totals(0.0, 0, 0), "/pod": totals(0.0, 500, 0)}, JUDGE, now=10.0)
    # 1 ms of stall in a second is 0.1 %: under the clear level, so the node is the source.
    r = board.step({NODE: totals(12.0, 900_000, 0), "/pod": totals(0.0, 1_500, 0)}, JUDGE, now=11.0)
    assert [x.key for x in r] == [NODE]
    # Readings closer together than MIN_RATE_SECS give no rate at all (no division by ~0).
    board = PressureBoard(max_defer=3)
    board.step({NODE: totals(0.0, 0, 0), "/pod": totals(0.0, 0, 0)}, JUDGE, now=10.0)
    r = board.step(
        {NODE: totals(12.0, 10_000, 0), "/pod": totals(0.0, 10_000, 0)}, JUDGE, now=10.01
    )
    assert [x.key for x in r] == [NODE]


def test_board_siblings_are_separate_incidents() -> None:
    board = PressureBoard()
    r = board.step({"/a": reading(11.0), "/b": reading(50.0), "/a/c": reading(0.0)}, JUDGE)
    assert sorted(x.key for x in r) == ["/a", "/b"]


def test_board_full_alone_starts_and_both_must_clear() -> None:
    board = PressureBoard()
    assert [x.key for x in board.step({"/a": reading(2.0, 6.0)}, JUDGE)] == ["/a"]
    assert board.step({"/a": reading(2.0, 3.0)}, JUDGE) == []  # full 3 >= 2.5: still active
    assert [x.transition for x in board.step({"/a": reading(2.0, 2.0)}, JUDGE)] == [
        Transition.CLEAR
    ]


def test_board_forgets_vanished_sources_and_is_bounded() -> None:
    board = PressureBoard(max_sources=2)
    board.step({"/a": reading(50.0), "/b": reading(50.0), "/c": reading(50.0)}, JUDGE)
    assert board.active() == {"/a", "/b"}  # /c beyond the bound is not tracked
    assert board.step({"/b": reading(50.0)}, JUDGE) == []  # /a gone: no report
    assert board.active() == {"/b"}


def test_cpu_judge_uses_some_only() -> None:
    judge = cpu_judge(50.0, 50.0)
    assert judge(reading(60.0, 0.0)) == (True, False, True)
    assert judge(reading(20.0, 90.0)) == (False, True, False)
