"""Edge detection with hysteresis, and the board that judges a tree of PSI sources.

* :class:`Hysteresis` (from :mod:`tapio.hysteresis`, shared with the controller's scheduler
  judges) is the one state machine every anomaly goes through: one transition when a condition
  starts, one when it clears, nothing while it lasts.
* :class:`PressureBoard` applies it to a tree of PSI sources (the node and cgroups) and reports
  each incident once, at the deepest cgroup that shows it: a cgroup under pressure makes every
  ancestor (and the node) show pressure too, and those echoes are not separate incidents.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tapio.hysteresis import Hysteresis, Transition, above, below, clamp_hysteresis
from tapio.observers.node.psi import NODE, PsiLine, PsiReading

__all__ = [
    "Hysteresis",
    "PressureBoard",
    "Report",
    "Transition",
    "above",
    "below",
    "clamp_hysteresis",
]

# ---- a tree of PSI sources -------------------------------------------------------------------


def is_ancestor(a: str, b: str) -> bool:
    """``a`` is a strict ancestor of ``b`` (the node is everyone's ancestor)."""
    if a == b or b == NODE:
        return False
    if a == NODE:
        return True
    return b.startswith(a.rstrip("/") + "/")


@dataclass(slots=True)
class _SourceState:
    edge: Hysteresis = field(default_factory=Hysteresis)
    reported: bool = False  # an occurrence (or a descendant's) covers the current incident
    deferred: int = 0  # rounds waited for a rising descendant
    seen: PsiReading | None = None  # the previous round's reading and its time (for the rate)
    seen_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Report:
    key: str
    transition: Transition
    reading: PsiReading
    covered: tuple[str, ...] = ()  # active ancestors folded into this report


Judge = Callable[[PsiReading], tuple[bool, bool, bool]]
"""reading → (starts, clears, rising): rising = above the clear level (may start soon)."""

MIN_RATE_SECS = 0.2  # a shorter gap between two readings says nothing about the stall rate


def _share(now: PsiLine, before: PsiLine, secs: float) -> PsiLine:
    share = max(0, now.total_us - before.total_us) / (secs * 1e6) * 100.0
    return PsiLine(avg10=min(share, 100.0))


def stall_rate(now: PsiReading, before: PsiReading, secs: float) -> PsiReading:
    """The stall share between two readings, shaped as a reading whose ``avg10`` is that share.

    ``avg10`` is recomputed by the kernel once per 2 s window, on each group's own clock: in the
    round the node's average crosses, a cgroup that is the real source can still show last
    window's figure. Its ``total`` grows as the stall happens, so the share since the previous
    round tells the board that the cgroup is rising before its average does.
    """
    full = None
    if now.full is not None and before.full is not None:
        full = _share(now.full, before.full, secs)
    return PsiReading(_share(now.some, before.some, secs), full)


class PressureBoard:
    """Hysteresis per PSI source, reported once per incident at the deepest source.

    Each round: every source steps its own state machine. A source that started is reported
    unless an active descendant already covers the incident (then it stays silent until it
    clears), or a descendant is rising (its average, or its stall share since the previous
    round, above its clear level) — then the report waits up to
    ``max_defer`` rounds for that descendant to start, so the first occurrence names the cgroup
    and not the node. ``CLEAR`` is reported only for sources that reported ``START``.
    """

    def __init__(self, max_defer: int = 3, max_sources: int = 4096) -> None:
        self.max_defer = max_defer
        self.max_sources = max_sources
        self._states: dict[str, _SourceState] = {}

    def active(self) -> set[str]:
        return {k for k, s in self._states.items() if s.edge.active}

    def reset(self) -> None:
        self._states.clear()

    def step(
        self, readings: Mapping[str, PsiReading], judge: Judge, now: float | None = None
    ) -> list[Report]:
        """One round: ``now`` (monotonic seconds) dates the readings for the stall rate."""
        if now is None:
            now = time.monotonic()
        reports: list[Report] = []
        rising: set[str] = set()
        started: list[str] = []
        for key, reading in readings.items():
            st = self._states.get(key)
            if st is None:
                if len(self._states) >= self.max_sources:
                    continue
                st = self._states[key] = _SourceState()
            starts, clears, is_rising = judge(reading)
            due = now - st.seen_at >= MIN_RATE_SECS  # a reading far enough back for a rate
            if not is_rising and st.seen is not None and due:
                is_rising = judge(stall_rate(reading, st.seen, now - st.seen_at))[2]
            if is_rising:
                rising.add(key)
            if st.seen is None or due:
                st.seen, st.seen_at = reading, now
            tr = st.edge.step(starts, clears)
            if tr is Transition.START:
                st.reported = False
                st.deferred = 0
            elif tr is Transition.CLEAR:
                if st.reported and st.deferred >= 0:
                    reports.append(Report(key, Transition.CLEAR, reading))
                st.reported = False
                st.deferred = 0
            if st.edge.active and not st.reported:
                started.append(key)
        # Sources that vanished (cgroup removed) are forgotten without a report.
        for key in [k for k in self._states if k not in readings]:
            del self._states[key]
        active = self.active()
        # Deepest first: a cgroup reports before (and instead of) its ancestors.
        started.sort(key=lambda k: (k == NODE, -k.count("/")))
        for key in started:
            st = self._states[key]
            if any(is_ancestor(key, other) for other in active):
                st.reported = True
                st.deferred = -1  # covered: silent now and at clear
                continue
            if st.deferred < self.max_defer and any(is_ancestor(key, r) for r in rising):
                st.deferred += 1
                continue
            st.reported = True
            st.deferred = 0
            covered = tuple(sorted(a for a in active if is_ancestor(a, key)))
            reports.append(Report(key, Transition.START, readings[key], covered))
        return reports


def memory_judge(some_pct: float, full_pct: float, hysteresis_pct: float) -> Judge:
    """Memory: ``some`` avg10 or ``full`` avg10 at its threshold starts; both under their clear
    levels clears."""

    def judge(r: PsiReading) -> tuple[bool, bool, bool]:
        s_start, s_clear = above(r.some.avg10, some_pct, hysteresis_pct)
        full = r.full.avg10 if r.full is not None else 0.0
        f_start, f_clear = above(full, full_pct, hysteresis_pct)
        return s_start or f_start, s_clear and f_clear, not (s_clear and f_clear)

    return judge


def cpu_judge(some_pct: float, hysteresis_pct: float) -> Judge:
    def judge(r: PsiReading) -> tuple[bool, bool, bool]:
        starts, clears = above(r.some.avg10, some_pct, hysteresis_pct)
        return starts, clears, not clears

    return judge
