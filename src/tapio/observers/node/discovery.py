"""Which cgroups the node observer watches: cgroup2 directories for PSI, cgroups with a quota.

One pass walks the cgroup2 tree (and, on a hybrid host, the v1 cpu tree) through the shared
walker of :mod:`tapio.observers.cgroups`. It is pure filesystem reading with no shared state, so
the observer runs it in a worker thread and applies the result on the event loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tapio.observers.cgroups import CgroupRoots, walk_cgroups
from tapio.observers.node.throttle import has_quota_v1, has_quota_v2

MAX_CGROUPS = 256  # cgroup2 directories watched for PSI
MAX_QUOTA_CGROUPS = 256  # cgroups with a CPU quota watched for throttling
MAX_WALK = 8192  # directories visited per discovery pass
MAX_DEPTH = 12

_CONTAINERISH = re.compile(
    r"(kubepods|docker|containerd|crio|libpod|lxc|machine\.slice|[0-9a-f]{64}|\.scope$)"
)


def pick_cgroups(paths: Sequence[str], cap: int) -> list[str]:
    """At most ``cap`` paths: container/pod-looking ones first, then the shallowest."""
    ranked = sorted(
        enumerate(paths), key=lambda ip: (0 if _CONTAINERISH.search(ip[1]) else 1, ip[0])
    )
    return [p for _, p in ranked[:cap]]


@dataclass(frozen=True, slots=True)
class Watched:
    """One discovery pass: PSI directories, and (hierarchy, path) → (cpu.stat, quota, period)."""

    psi_cgroups: list[str] = field(default_factory=list)
    quotas: dict[tuple[str, str], tuple[Path, int, int]] = field(default_factory=dict)


def discover(roots: CgroupRoots) -> Watched:
    unified = roots.unified
    v2: list[str] = []
    if unified is not None:
        v2 = [
            p
            for p in walk_cgroups(unified, MAX_WALK, MAX_DEPTH)
            if (unified / p.lstrip("/") / "memory.pressure").exists()
        ]
    found: dict[tuple[str, str], tuple[Path, int, int]] = {}
    sources: list[tuple[str, Path, Sequence[str], Callable[[Path], tuple[int, int] | None]]] = []
    if roots.cpu_v1 is not None:
        cpu = roots.cpu_v1
        sources.append(("cpu", cpu, list(walk_cgroups(cpu, MAX_WALK, MAX_DEPTH)), has_quota_v1))
    if unified is not None:
        sources.append(("unified", unified, v2, has_quota_v2))
    for hierarchy, root, paths, probe in sources:
        for p in paths:
            if len(found) >= MAX_QUOTA_CGROUPS:
                break
            d = root / p.lstrip("/")
            q = probe(d)
            if q is not None:
                found[(hierarchy, p)] = (d / "cpu.stat", q[0], q[1])
    return Watched(pick_cgroups(v2, MAX_CGROUPS), found)
