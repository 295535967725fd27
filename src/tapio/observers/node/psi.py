"""Pressure stall information (PSI): reading it and being woken when it rises.

* :func:`parse_psi` reads ``/proc/pressure/*`` and cgroup2 ``*.pressure`` files.
* :class:`TriggerSet` arms PSI triggers (``some <stall us> <window us>`` written to the file) and
  multiplexes them on one epoll fd (EPOLLPRI, edge-triggered) so the agent can wait on it with
  ``anyio.wait_readable``. Triggers need CAP_SYS_RESOURCE for windows that are not a multiple of
  2 s, and ``/proc/pressure`` refuses unprivileged triggers; what cannot be armed is sampled.

Judging readings (hysteresis, one report per incident) is :mod:`tapio.observers.node.board`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
from dataclasses import dataclass
from pathlib import Path

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


class PsiWatch:
    """The PSI sources the node observer reads: the node and watched cgroup2 directories, each
    sampled, and armed with triggers (bounded) that are re-armed when the thresholds change."""

    def __init__(self, unified: Path | None, max_triggers: int) -> None:
        self.unified = unified
        self.max_triggers = max_triggers
        self.cgroups: list[str] = []
        self.triggers: TriggerSet | None = None
        self._armed_for: tuple[float, float] | None = None

    def path(self, key: str, resource: str) -> str:
        if key == NODE:
            return f"/proc/pressure/{resource}"
        assert self.unified is not None
        return f"{self.unified}{key}/{resource}.pressure"

    def sync(self, memory_pct: float, cpu_pct: float) -> None:
        """Arm the node and the watched cgroups; paths that refused a trigger are not retried
        until the next rescan (``triggers.failures`` is cleared then) and are sampled."""
        want = (memory_pct, cpu_pct)
        if self.triggers is None or self._armed_for != want:
            if self.triggers is not None:
                self.triggers.close()
            self.triggers = TriggerSet(2 * self.max_triggers)
            self._armed_for = want
        ts = self.triggers
        wanted: dict[str, float] = {}
        for resource, pct in (("memory", memory_pct), ("cpu", cpu_pct)):
            for k in (NODE, *self.cgroups):
                wanted[self.path(k, resource)] = pct
        for stale in ts.paths - set(wanted):
            ts.disarm(stale)
        for p, pct in wanted.items():
            if p not in ts.failures:
                ts.arm(p, pct)

    def sample(self) -> tuple[dict[str, PsiReading], dict[str, PsiReading]]:
        mem: dict[str, PsiReading] = {}
        cpu: dict[str, PsiReading] = {}
        for key in (NODE, *self.cgroups):
            r = read_psi(self.path(key, "memory"))
            if r is not None:
                mem[key] = r
            r = read_psi(self.path(key, "cpu"))
            if r is not None:
                cpu[key] = r
        return mem, cpu

    def close(self) -> None:
        if self.triggers is not None:
            self.triggers.close()
            self.triggers = None
            self._armed_for = None
