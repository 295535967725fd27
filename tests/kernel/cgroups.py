"""The cgroup layout the kernel tests run on, and the few operations they need on it.

Two layouts are tested: pure cgroup v2 (one cgroup2 mount at /sys/fs/cgroup, the layout of
current Kubernetes nodes and of the kernel matrix's guests) and hybrid (v1 controllers under
/sys/fs/cgroup/<controller> plus a controller-less cgroup2 at /sys/fs/cgroup/unified, as on the
development VM). Tests ask for a hierarchy by role ("memory", "cpu", "unified"); on pure v2 all
three roles are the same directory, so a test creates it once and moves its process once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CG = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each role lives; ``None`` when this host has no such hierarchy."""

    v2: bool  # pure cgroup v2
    unified: Path | None
    memory: Path | None
    cpu: Path | None

    def root(self, role: str) -> Path | None:
        return {"unified": self.unified, "memory": self.memory, "cpu": self.cpu}[role]

    def roots(self, roles: Sequence[str]) -> list[Path]:
        """The distinct roots for ``roles`` (on pure v2 several roles share one)."""
        out: list[Path] = []
        for role in roles:
            r = self.root(role)
            if r is not None and r not in out:
                out.append(r)
        return out


def _is_cgroup2(path: Path) -> bool:
    # statvfs has no f_type; cgroup.controllers exists only at a cgroup2 root or below.
    return (path / "cgroup.controllers").exists()


def layout() -> Layout:
    if _is_cgroup2(CG):
        return Layout(True, CG, CG, CG)
    unified = CG / "unified"
    return Layout(
        False,
        unified if _is_cgroup2(unified) else None,
        CG / "memory" if (CG / "memory" / "cgroup.procs").exists() else None,
        CG / "cpu" if (CG / "cpu" / "cgroup.procs").exists() else None,
    )


def missing(roles: Sequence[str]) -> list[str]:
    """The roles this host has no hierarchy for (a test skips, or fails in CI, on them)."""
    lay = layout()
    return [r for r in roles if lay.root(r) is None]


def enable_controllers(root: Path, rel: str, controllers: Sequence[str]) -> None:
    """On cgroup2, create ``root/rel`` with ``controllers`` delegated down to it.

    A cgroup2 directory only has ``memory.max``/``cpu.max`` when its parent lists the controller
    in ``cgroup.subtree_control``. The root enables them for its children even with processes in
    it; the test-owned intermediate directories hold no processes, so they may enable too. A
    controller enabled at the root stays enabled (production nodes always have them enabled).
    """
    d = root
    for part in (p for p in rel.split("/") if p):
        ctl = d / "cgroup.subtree_control"
        missing = [c for c in controllers if c not in ctl.read_text().split()]
        if missing:
            ctl.write_text(" ".join(f"+{c}" for c in missing))
        d = d / part
        d.mkdir(exist_ok=True)


def rmdir_cgroup(path: Path) -> None:
    """Remove a cgroup dir and its subtree, deepest first; tasks still inside are killed."""
    if not path.is_dir():
        return
    subtree = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*subtree, path]:
        for _ in range(100):
            with contextlib.suppress(OSError, ValueError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def cgroup_dirs(
    roles: Sequence[str], rel: str, controllers: Sequence[str] = ()
) -> Iterator[dict[str, Path]]:
    """Create ``rel`` under the root of each role; yield {role: dir}; remove it on every exit.

    ``controllers`` are the cgroup2 controllers the leaf needs (pure v2 only; on hybrid the v1
    hierarchies have them by construction). Callers check :func:`missing` first.
    """
    lay = layout()
    if missing(roles):
        raise ValueError(f"no cgroup hierarchy for {', '.join(missing(roles))} on this host")
    top = rel.split("/")[0]
    made: list[Path] = []
    try:
        for root in lay.roots(roles):
            made.append(root / top)
            if lay.v2 and controllers:
                enable_controllers(root, rel, controllers)
            (root / rel).mkdir(parents=True, exist_ok=True)
        yield {r: lay.root(r) / rel for r in roles}  # type: ignore[operator]
    finally:
        for d in made:
            rmdir_cgroup(d)


def set_memory_limit(d: Path, limit: int) -> None:
    if (d / "memory.max").exists():
        (d / "memory.max").write_text(str(limit))
        with contextlib.suppress(OSError):
            (d / "memory.swap.max").write_text("0")
    else:
        (d / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):
            (d / "memory.swappiness").write_text("0")


def set_cpu_quota(d: Path, quota_us: int, period_us: int) -> None:
    if (d / "cpu.max").exists():
        (d / "cpu.max").write_text(f"{quota_us} {period_us}")
    else:
        (d / "cpu.cfs_period_us").write_text(str(period_us))
        (d / "cpu.cfs_quota_us").write_text(str(quota_us))


def memory_events(d: Path) -> dict[str, int]:
    """How often the limit was hit and how many OOM kills, in either hierarchy's terms."""
    if (d / "memory.events").exists():
        ev = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
        return {"limit_hits": int(ev.get("max", 0)), "oom_kill": int(ev.get("oom_kill", 0))}
    ctl = dict(line.split() for line in (d / "memory.oom_control").read_text().splitlines())
    return {
        "limit_hits": int((d / "memory.failcnt").read_text()),
        "oom_kill": int(ctl.get("oom_kill", 0)),
    }


def memory_peak(d: Path, limit: int) -> int:
    """The cgroup's peak usage; a v2 kernel older than 5.19 has no ``memory.peak``: at an OOM
    kill the charge reached the limit, so the limit is the peak there."""
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        with contextlib.suppress(OSError):
            return int((d / name).read_text())
    return limit
