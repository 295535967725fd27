"""Flood control at the edge: identical DNS failures become one occurrence with a count.

A broken resolver turns every lookup of every pod into a failure; thousands of identical
occurrences would bury the one fact that matters. Failures with the same flood key (type,
name, server, transport, RCODE, cgroup) inside ``window_ns`` of the first are held as one group;
when the window ends the group's first occurrence leaves with ``count`` set to the number of
failures it stands for. A per-second cap bounds how many groups may open; failures past it,
and failures arriving while the group table is full, are counted drops, never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tapio.observers.dns.classify import Classified, FloodKey
from tapio.occurrence import Occurrence

MAX_GROUPS = 4096


@dataclass(slots=True)
class _Group:
    occurrence: Occurrence
    deadline_ns: int
    count: int = 1


class FloodControl:
    def __init__(self, window_ns: int, cap_per_second: int, drop: Callable[[str, int], None]):
        self.window_ns = window_ns
        self.cap = cap_per_second
        self._drop = drop
        self._groups: dict[FloodKey, _Group] = {}
        self._second = -1
        self._opened = 0

    def configure(self, window_ns: int, cap_per_second: int) -> None:
        self.window_ns = window_ns
        self.cap = cap_per_second

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, item: Classified, now_ns: int) -> Occurrence | None:
        """Take one failure; returns an occurrence to emit at once (window 0), else None."""
        group = self._groups.get(item.key)
        if group is not None:
            group.count += 1
            return None
        second = now_ns // 1_000_000_000
        if second != self._second:
            self._second, self._opened = second, 0
        if self._opened >= self.cap:
            self._drop("dns_rate_capped", 1)
            return None
        if len(self._groups) >= MAX_GROUPS:
            self._drop("dns_flood_table_full", 1)
            return None
        self._opened += 1
        if self.window_ns <= 0:
            return item.occurrence
        self._groups[item.key] = _Group(item.occurrence, now_ns + self.window_ns)
        return None

    def due(self, now_ns: int, *, everything: bool = False) -> list[Occurrence]:
        """The groups whose window ended (all of them with ``everything``), with their count."""
        out: list[Occurrence] = []
        for key in [k for k, g in self._groups.items() if everything or g.deadline_ns <= now_ns]:
            group = self._groups.pop(key)
            occ = group.occurrence
            if occ.data is not None:
                occ.data["count"] = group.count
                occ.data["window_ms"] = self.window_ns // 1_000_000  # sorts last: order kept
            if group.count > 1 and occ.error is not None:
                window_ms = self.window_ns // 1_000_000
                occ.error.message += f" ({group.count} times within {window_ms} ms)"
            out.append(occ)
        return out
