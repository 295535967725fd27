"""CFS bandwidth throttling: which cgroups have a CPU quota, and how often they were throttled.

v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, ``throttled_time`` in ns) and cgroup2
(``cpu.max``, ``throttled_usec``) are read the same way; the judged value is the share of the
interval's periods that were throttled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path


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
