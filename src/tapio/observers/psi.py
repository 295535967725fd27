"""Pressure stall information (PSI) and the edge/hysteresis logic of the node observer.

* :func:`parse_psi` reads ``/proc/pressure/*`` and cgroup2 ``*.pressure`` files.
* :class:`TriggerSet` arms PSI triggers (``some <stall us> <window us>`` written to the file) and
  multiplexes them on one epoll fd (EPOLLPRI, edge-triggered) so the agent can wait on it with
  ``anyio.wait_readable``. Triggers need CAP_SYS_RESOURCE for windows that are not a multiple of
  2 s, and ``/proc/pressure`` refuses unprivileged triggers; what cannot be armed is sampled.
* :class:`Hysteresis` is the one state machine every node anomaly goes through: one transition
  when a condition starts, one when it clears, nothing while it lasts.
* :class:`PressureBoard` applies it to a tree of PSI sources (the node and cgroups) and reports
  each incident once, at the deepest cgroup that shows it: a cgroup under pressure makes every
  ancestor (and the node) show pressure too, and those echoes are not separate incidents.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

NODE = "node"
"""The key of the node-wide PSI source; cgroup keys are paths starting with ``/``."""


@dataclass(frozen=True, slots=True)
class PsiLine:
    avg10: float = 0.0
    avg60: float = 0.0
    avg300: float = 0.0
    total_us: int = 0


@dataclass(frozen=True, slots=True)
class PsiReading:
    some: PsiLine = PsiLine()
    full: PsiLine | None = None  # cpu pressure of the whole system has no "full" before 5.13


def parse_psi(text: str) -> PsiReading:
    """``some avg10=1.00 avg60=0.50 avg300=0.10 total=12345`` (and a ``full`` line)."""
    some: PsiLine | None = None
    full: PsiLine | None = None
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        values: dict[str, str] = {}
        for item in rest.split():
            k, _, v = item.partition("=")
            values[k] = v
        try:
            parsed = PsiLine(
                float(values.get("avg10", "0")),
                float(values.get("avg60", "0")),
                float(values.get("avg300", "0")),
                int(values.get("total", "0")),
            )
        except ValueError as exc:
            raise ValueError(f"malformed PSI line {line!r}") from exc
        if kind == "some":
            some = parsed
        else:
            full = parsed
    if some is None:
        raise ValueError("PSI text has no 'some' line")
    return PsiReading(some, full)


def read_psi(path: str) -> PsiReading | None:
    """The file parsed, or None when it is gone or unreadable (a cgroup removed meanwhile)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(512).decode("ascii", "replace")
    except OSError:
        return None
    try:
        return parse_psi(text)
    except ValueError:
        return None


# ---- triggers ---------------------------------------------------------------------------------

#: Windows tried in order: 1 s needs CAP_SYS_RESOURCE; unprivileged triggers need a multiple of
#: 2 s (kernel >= 6.5).
TRIGGER_WINDOWS_US = (1_000_000, 2_000_000)


def trigger_spec(pct: float, window_us: int, kind: str = "some") -> bytes:
    """``some <stall us> <window us>``: fire when stalled ``pct`` % of a window."""
    stall = int(window_us * pct / 100.0)
    stall = max(1, min(stall, window_us - 1))
    return f"{kind} {stall} {window_us}".encode()


class TriggerSet:
    """PSI triggers on one epoll fd; bounded by ``max_triggers`` open fds."""

    def __init__(self, max_triggers: int) -> None:
        self.max_triggers = max_triggers
        self._ep = select.epoll()
        self._by_fd: dict[int, str] = {}
        self._by_path: dict[str, int] = {}
        #: Last failure per path (errno name), for the capability detail.
        self.failures: dict[str, str] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def paths(self) -> set[str]:
        return set(self._by_path)

    def arm(self, path: str, pct: float) -> bool:
        """Arm a ``some`` trigger at ``pct`` % on ``path``; False when it cannot be armed."""
        if path in self._by_path:
            return True
        if len(self._by_path) >= self.max_triggers or pct <= 0:
            return False
        last = "unknown"
        for window in TRIGGER_WINDOWS_US:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self.failures[path] = errno.errorcode.get(exc.errno or 0, "error")
                return False
            try:
                os.write(fd, trigger_spec(pct, window))
                self._ep.register(fd, select.EPOLLPRI | select.EPOLLERR | select.EPOLLET)
            except OSError as exc:
                os.close(fd)
                last = errno.errorcode.get(exc.errno or 0, "error")
                continue
            self._by_fd[fd] = path
            self._by_path[path] = fd
            self.failures.pop(path, None)
            return True
        self.failures[path] = last
        return False

    def disarm(self, path: str) -> None:
        fd = self._by_path.pop(path, None)
        if fd is None:
            return
        self._by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)
        os.close(fd)

    def fired(self) -> set[str]:
        """Paths whose trigger fired since the last call (never blocks)."""
        out: set[str] = set()
        for fd, _events in self._ep.poll(0):
            path = self._by_fd.get(fd)
            if path is not None:
                out.add(path)
        return out

    def close(self) -> None:
        for path in list(self._by_path):
            self.disarm(path)
        self._ep.close()


# ---- edge-triggered state with hysteresis ----------------------------------------------------


class Transition(Enum):
    START = "start"
    CLEAR = "clear"


@dataclass(slots=True)
class Hysteresis:
    """Edge detection: ``start`` once when a condition begins, ``clear`` once when it ends.

    The caller decides what "begins" and "ended" mean (:func:`above` and :func:`below` give the
    usual threshold/hysteresis pair); between the two the state holds, so a value hovering just
    under the threshold neither re-fires nor clears.
    """

    active: bool = False

    def step(self, starts: bool, clears: bool) -> Transition | None:
        if not self.active and starts:
            self.active = True
            return Transition.START
        if self.active and clears:
            self.active = False
            return Transition.CLEAR
        return None


def above(value: float, threshold: float, hysteresis_pct: float) -> tuple[bool, bool]:
    """(starts, clears) for a high-is-bad value: starts at ``>= threshold``, clears below
    ``threshold × hysteresis_pct / 100``. A threshold <= 0 never starts (disabled)."""
    if threshold <= 0:
        return False, True
    return value >= threshold, value < threshold * clamp_hysteresis(hysteresis_pct) / 100.0


def below(value: float, threshold: float, hysteresis_pct: float) -> tuple[bool, bool]:
    """(starts, clears) for a low-is-bad value (IPC): starts at ``< threshold``, clears at
    ``>= threshold × (2 - hysteresis_pct / 100)`` (mirror image of :func:`above`)."""
    if threshold <= 0:
        return False, True
    h = clamp_hysteresis(hysteresis_pct) / 100.0
    return value < threshold, value >= threshold * (2.0 - h)


def clamp_hysteresis(pct: float) -> float:
    """0 < hysteresis <= 100 (100 = clear as soon as the value is under the threshold)."""
    return min(100.0, max(1.0, pct))


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


@dataclass(frozen=True, slots=True)
class Report:
    key: str
    transition: Transition
    reading: PsiReading
    covered: tuple[str, ...] = ()  # active ancestors folded into this report


Judge = Callable[[PsiReading], tuple[bool, bool, bool]]
"""reading → (starts, clears, rising): rising = above the clear level (may start soon)."""


class PressureBoard:
    """Hysteresis per PSI source, reported once per incident at the deepest source.

    Each round: every source steps its own state machine. A source that started is reported
    unless an active descendant already covers the incident (then it stays silent until it
    clears), or a descendant is rising (above its clear level) — then the report waits up to
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

    def step(self, readings: Mapping[str, PsiReading], judge: Judge) -> list[Report]:
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
            if is_rising:
                rising.add(key)
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


def psi_facts(r: PsiReading) -> dict[str, object]:
    facts: dict[str, object] = {
        "some_avg10": r.some.avg10,
        "some_avg60": r.some.avg60,
        "some_avg300": r.some.avg300,
        "some_total_us": r.some.total_us,
    }
    if r.full is not None:
        facts.update(
            full_avg10=r.full.avg10,
            full_avg60=r.full.avg60,
            full_avg300=r.full.avg300,
            full_total_us=r.full.total_us,
        )
    return facts
