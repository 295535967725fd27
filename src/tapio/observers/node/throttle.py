"""CFS bandwidth throttling: which cgroups have a CPU quota, and how often they were throttled.

v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, ``throttled_time`` in ns) and cgroup2
(``cpu.max``, ``throttled_usec``) are read the same way; the judged value is the share of the
interval's periods that were throttled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from tapio.observers.node.board import Hysteresis, Transition, above

THROTTLE_MIN_PERIODS = 5  # periods elapsed in an interval before a throttled share is judged


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
class QuotaCgroup:
    hierarchy: str  # "cpu" (v1) or "unified" (v2)
    path: str
    stat_file: Path
    quota_us: int
    period_us: int
    prev: CpuStat | None = None


Key = tuple[str, str]  # (hierarchy: "cpu" (v1) or "unified" (v2), cgroup path)


class ThrottleWatch:
    """The cgroups with a CPU quota, their last ``cpu.stat`` and one edge per cgroup."""

    def __init__(self) -> None:
        self.quota: dict[Key, QuotaCgroup] = {}
        self.edges: dict[Key, Hysteresis] = {}

    def apply(self, found: dict[Key, tuple[Path, int, int]]) -> None:
        """Watch what a discovery pass found (``cpu.stat`` path, quota, period per cgroup)."""
        for key in [k for k in self.quota if k not in found]:
            del self.quota[key]
            self.edges.pop(key, None)
        for key, (stat, quota, period) in found.items():
            cur = self.quota.get(key)
            if cur is None:
                self.quota[key] = QuotaCgroup(key[0], key[1], stat, quota, period)
            else:
                cur.quota_us, cur.period_us = quota, period

    def reset(self) -> None:
        self.edges.clear()
        for q in self.quota.values():
            q.prev = None

    def read(self) -> dict[Key, ThrottleDelta]:
        """Growth since the last read, per cgroup (none on the first read or after a reset)."""
        out: dict[Key, ThrottleDelta] = {}
        for key, q in self.quota.items():
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

    def step(
        self, deltas: dict[Key, ThrottleDelta], throttle_pct: float, hysteresis_pct: float
    ) -> list[tuple[Key, ThrottleDelta, Transition]]:
        """The transitions of this interval; too few periods to judge never starts."""
        out: list[tuple[Key, ThrottleDelta, Transition]] = []
        for key, d in deltas.items():
            edge = self.edges.setdefault(key, Hysteresis())
            if d.periods < THROTTLE_MIN_PERIODS:
                starts, clears = False, d.periods == 0
            else:
                starts, clears = above(d.pct, throttle_pct, hysteresis_pct)
            tr = edge.step(starts, clears)
            if tr is not None:
                out.append((key, d, tr))
        for key in [k for k in self.edges if k not in self.quota]:
            del self.edges[key]
        return out
