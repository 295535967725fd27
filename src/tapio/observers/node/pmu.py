"""Hardware performance counters for the node observer, through raw ``perf_event_open``.

Many nodes (most VMs, this test machine) have no hardware PMU; :func:`probe` says so without
side effects and the node observer then reports the capability as unavailable. Where counters
exist, :class:`PmuSampler` opens cycles, instructions and (when the PMU has it) backend stall
cycles on every online CPU, and :func:`interval_sample` turns two readings into per-interval
values: deltas (never lifetime totals) scaled for multiplexing by
``Δvalue × Δtime_enabled / Δtime_running``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass

PERF_TYPE_HARDWARE = 0
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
PERF_COUNT_HW_STALLED_CYCLES_BACKEND = 8

PERF_FORMAT_TOTAL_TIME_ENABLED = 1 << 0
PERF_FORMAT_TOTAL_TIME_RUNNING = 1 << 1

ATTR_FLAG_EXCLUDE_HV = 1 << 6
PERF_ATTR_SIZE = 136  # PERF_ATTR_SIZE_VER7
PERF_FLAG_FD_CLOEXEC = 1 << 3

_SYSCALL_NR = {"x86_64": 298, "amd64": 298, "aarch64": 241, "arm64": 241}
_READ = struct.Struct("<QQQ")  # value, time_enabled, time_running

#: Readings per CPU are bounded by the CPUs the kernel reports online; never more than this.
MAX_CPUS = 1024


def perf_attr(config: int, type_: int = PERF_TYPE_HARDWARE) -> bytes:
    """A counting (non-sampling) ``struct perf_event_attr`` reading enabled/running times."""
    buf = bytearray(PERF_ATTR_SIZE)
    struct.pack_into("<IIQ", buf, 0, type_, PERF_ATTR_SIZE, config)
    struct.pack_into("<Q", buf, 32, PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING)
    struct.pack_into("<Q", buf, 40, ATTR_FLAG_EXCLUDE_HV)
    return bytes(buf)


def perf_event_open(attr: bytes, pid: int, cpu: int, group_fd: int = -1) -> int:
    """The raw syscall; returns an fd or raises OSError with the kernel's errno."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise OSError(
            errno.ENOSYS, f"perf_event_open: unknown syscall number on {platform.machine()}"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = int(
        libc.syscall(
            ctypes.c_long(nr),
            buf,
            ctypes.c_int(pid),
            ctypes.c_int(cpu),
            ctypes.c_int(group_fd),
            ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def probe() -> tuple[bool, str]:
    """Whether a hardware instructions counter can be opened on CPU 0 (and why not)."""
    try:
        fd = perf_event_open(perf_attr(PERF_COUNT_HW_INSTRUCTIONS), -1, 0)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
            why = "no hardware PMU"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            why = "not permitted (needs CAP_PERFMON or a lower perf_event_paranoid)"
        else:
            why = "hardware counters unavailable"
        return False, f"{why}: perf_event_open(PERF_COUNT_HW_INSTRUCTIONS) failed with {name}"
    os.close(fd)
    return True, "hardware instructions/cycles counters available"


@dataclass(frozen=True, slots=True)
class Reading:
    """One ``read()`` of a counter opened with TOTAL_TIME_ENABLED|TOTAL_TIME_RUNNING."""

    value: int
    enabled: int
    running: int

    @classmethod
    def decode(cls, raw: bytes) -> Reading:
        value, enabled, running = _READ.unpack_from(raw)
        return cls(value, enabled, running)


def scaled_delta(prev: Reading, cur: Reading) -> float | None:
    """The counter's increase over the interval, scaled for multiplexing.

    ``Δvalue × Δenabled / Δrunning``: when the PMU multiplexed the event onto the hardware for
    only part of the interval, the count is extrapolated to the whole interval. None when the
    counter did not run at all in the interval (nothing to say) or went backwards (reset).
    """
    dv = cur.value - prev.value
    de = cur.enabled - prev.enabled
    dr = cur.running - prev.running
    if dr <= 0 or de < 0 or dv < 0:
        return None
    if de <= dr:
        return float(dv)
    return dv * de / dr


@dataclass(frozen=True, slots=True)
class IntervalSample:
    cycles: float
    instructions: float
    stall_cycles: float | None
    cpus: int  # CPUs that contributed

    @property
    def ipc(self) -> float:
        return self.instructions / self.cycles if self.cycles > 0 else 0.0

    @property
    def stall_pct(self) -> float | None:
        if self.stall_cycles is None or self.cycles <= 0:
            return None
        return 100.0 * self.stall_cycles / self.cycles


CpuReadings = tuple[Reading, Reading, Reading | None]  # cycles, instructions, stalls


def interval_sample(
    prev: Sequence[CpuReadings | None], cur: Sequence[CpuReadings | None]
) -> IntervalSample | None:
    """Node-wide per-interval totals from two readings of every CPU's counters.

    A CPU contributes only when both its cycles and instructions deltas are defined; the stall
    total is defined only when every contributing CPU has one.
    """
    cycles = 0.0
    instructions = 0.0
    stalls: float | None = 0.0
    cpus = 0
    for p, c in zip(prev, cur, strict=False):
        if p is None or c is None:
            continue
        dc = scaled_delta(p[0], c[0])
        di = scaled_delta(p[1], c[1])
        if dc is None or di is None:
            continue
        cpus += 1
        cycles += dc
        instructions += di
        ds = scaled_delta(p[2], c[2]) if p[2] is not None and c[2] is not None else None
        if ds is None:
            stalls = None
        elif stalls is not None:
            stalls += ds
    if cpus == 0:
        return None
    return IntervalSample(cycles, instructions, stalls, cpus)


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    """CPU numbers from a kernel cpulist ("0-3,5"); falls back to os.cpu_count()."""
    try:
        text = open(path).read().strip()  # noqa: SIM115 - tiny sysfs file
    except OSError:
        return list(range(min(os.cpu_count() or 1, MAX_CPUS)))
    return parse_cpulist(text)


def parse_cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        start = int(lo)
        end = int(hi) if hi else start
        cpus.extend(range(start, end + 1))
        if len(cpus) >= MAX_CPUS:
            return cpus[:MAX_CPUS]
    return cpus


class PmuSampler:
    """Counting events on every online CPU; :meth:`read` returns one reading set per CPU.

    Cycles failing on a CPU skips that CPU; instructions failing skips it too; the stall event is
    optional (most Intel PMUs do not expose STALLED_CYCLES_BACKEND). Every fd is closed by
    :meth:`close`.
    """

    def __init__(self, cpus: Sequence[int] | None = None) -> None:
        self.cpus = list(cpus) if cpus is not None else online_cpus()
        self._fds: list[tuple[int, int, int | None] | None] = []
        self.stall_supported = False
        try:
            for cpu in self.cpus:
                self._fds.append(self._open_cpu(cpu))
        except BaseException:
            self.close()
            raise
        if not any(self._fds):
            self.close()
            raise OSError(errno.ENOENT, "no CPU could open hardware cycles+instructions counters")
        self.stall_supported = all(f is None or f[2] is not None for f in self._fds)

    @staticmethod
    def _open_cpu(cpu: int) -> tuple[int, int, int | None] | None:
        try:
            cyc = perf_event_open(perf_attr(PERF_COUNT_HW_CPU_CYCLES), -1, cpu)
        except OSError:
            return None
        try:
            ins = perf_event_open(perf_attr(PERF_COUNT_HW_INSTRUCTIONS), -1, cpu)
        except OSError:
            os.close(cyc)
            return None
        try:
            stl: int | None = perf_event_open(
                perf_attr(PERF_COUNT_HW_STALLED_CYCLES_BACKEND), -1, cpu
            )
        except OSError:
            stl = None
        return cyc, ins, stl

    def read(self) -> list[CpuReadings | None]:
        out: list[CpuReadings | None] = []
        for fds in self._fds:
            if fds is None:
                out.append(None)
                continue
            try:
                cyc = Reading.decode(os.read(fds[0], _READ.size))
                ins = Reading.decode(os.read(fds[1], _READ.size))
                stl = Reading.decode(os.read(fds[2], _READ.size)) if fds[2] is not None else None
            except OSError:
                out.append(None)
                continue
            out.append((cyc, ins, stl))
        return out

    def close(self) -> None:
        while self._fds:
            fds = self._fds.pop()
            if fds is None:
                continue
            for fd in fds:
                if fd is not None:
                    os.close(fd)


class PmuWatch:
    """The counters as the node observer uses them: probed at attach, opened on first use,
    closed when disabled, one interval sample per tick."""

    def __init__(self) -> None:
        self.available = False
        self.detail = "not probed"
        self._sampler: PmuSampler | None = None
        self._prev: list[CpuReadings | None] | None = None

    def probe(self) -> bool:
        self.available, self.detail = probe()
        return self.available

    def forget(self) -> None:
        """Drop the previous reading (the next tick only starts a new interval)."""
        self._prev = None

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        self._prev = None

    def tick(self, wanted: bool) -> IntervalSample | None:
        """This interval's sample; None while there is none (first tick, disabled, no PMU).
        Raises OSError (and becomes unavailable) when the counters cannot be opened."""
        if not self.available or not wanted:
            self.close()
            return None
        if self._sampler is None:
            try:
                self._sampler = PmuSampler()
            except OSError as exc:
                self.available = False
                self.detail = f"hardware counters could not be opened: {exc}"
                raise
        cur = self._sampler.read()
        prev, self._prev = self._prev, cur
        return interval_sample(prev, cur) if prev is not None else None
