"""Where the cgroup hierarchies are, how to walk one, and what ``/proc/<pid>/cgroup`` says.

A hierarchy's directories are walked breadth first and bounded; the inode of each directory is
the cgroup id the kernel reports, which is what makes resolution independent of the reader's
cgroup namespace.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

HIERARCHIES = ("unified", "memory", "cpu")
#: Where the host's cgroupfs is mounted on a node; an agent in a pod mounts it elsewhere.
DEFAULT_ROOT = Path("/sys/fs/cgroup")
#: Environment variable naming the host cgroupfs root (e.g. ``/host/sys/fs/cgroup`` in a pod).
ROOT_ENV = "TAPIO_CGROUP_ROOT"

U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
UNLIMITED_FLOOR = 1 << 62  # v1 reports "unlimited" as a huge page-aligned number
MAX_WALK = 65536  # directories visited by one indexing walk


# ---- where the hierarchies are ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupRoots:
    """The mount point of each hierarchy Tapio reads; ``None`` where the host has none."""

    unified: Path | None = None  # the cgroup2 tree (hybrid: /sys/fs/cgroup/unified)
    memory: Path | None = None  # the memory controller's tree (pure cgroup2: == unified)
    cpu: Path | None = None  # the cpu controller's tree (pure cgroup2: == unified)

    @classmethod
    def from_mapping(cls, roots: Mapping[str, Path]) -> CgroupRoots:
        return cls(roots.get("unified"), roots.get("memory"), roots.get("cpu"))

    def get(self, hierarchy: str) -> Path | None:
        if hierarchy == "unified":
            return self.unified
        if hierarchy == "memory":
            return self.memory
        if hierarchy == "cpu":
            return self.cpu
        return None

    @property
    def cpu_v1(self) -> Path | None:
        """The v1 cpu controller's own tree; None on a pure cgroup2 host."""
        return self.cpu if self.cpu is not None and self.cpu != self.unified else None

    def distinct(self) -> list[Path]:
        """Every tree once (on a pure cgroup2 host that is one tree)."""
        seen: dict[str, Path] = {}
        for p in (self.unified, self.memory, self.cpu):
            if p is not None:
                seen.setdefault(str(p), p)
        return list(seen.values())


def _v2_controllers(v2: Path) -> list[str]:
    try:
        return (v2 / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def roots_from_mountinfo(mountinfo: Path = Path("/proc/self/mountinfo")) -> CgroupRoots:
    """The hierarchies mounted in this mount namespace (only mounts of a tree's root count)."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return CgroupRoots()
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3 or fields[3] != "/":
            continue
        mnt = Path(fields[4].replace("\\040", " "))
        fstype, opts = rfields[0], rfields[2].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = mnt
        elif fstype == "cgroup":
            for ctrl in ("memory", "cpu"):
                if ctrl in opts and ctrl not in v1:
                    v1[ctrl] = mnt
    return _with_v2_controllers(v2, v1)


def _with_v2_controllers(v2: Path | None, v1: dict[str, Path]) -> CgroupRoots:
    """v1 controller trees win; a controller enabled in cgroup2 lives in the cgroup2 tree."""
    controllers = _v2_controllers(v2) if v2 is not None else []
    mem = v1.get("memory") or (v2 if "memory" in controllers else None)
    cpu = v1.get("cpu") or (v2 if "cpu" in controllers else None)
    return CgroupRoots(v2, mem, cpu)


def roots_at(base: Path) -> CgroupRoots:
    """The hierarchies under a cgroupfs root directory such as a pod's ``/host/sys/fs/cgroup``.

    Mountinfo cannot be used there: with a private cgroup namespace the host's trees appear
    with a root outside the namespace. The layout is recognised by its files instead: a cgroup2
    root holds ``cgroup.controllers`` (pure cgroup2); a hybrid host has ``unified`` (cgroup2),
    ``memory`` and ``cpu`` (or ``cpu,cpuacct``) subdirectories.
    """
    if (base / "cgroup.controllers").exists():
        return _with_v2_controllers(base, {})
    v2 = base / "unified"
    v1: dict[str, Path] = {}
    for ctrl, names in (("memory", ("memory",)), ("cpu", ("cpu", "cpu,cpuacct"))):
        for name in names:
            if (base / name / "cgroup.procs").exists():
                v1[ctrl] = base / name
                break
    return _with_v2_controllers(v2 if (v2 / "cgroup.procs").exists() else None, v1)


def discover_roots(
    host_root: Path | None = None, mountinfo: Path = Path("/proc/self/mountinfo")
) -> CgroupRoots:
    """``host_root`` (or ``$TAPIO_CGROUP_ROOT``) when configured, else this namespace's mounts."""
    if host_root is None and os.environ.get(ROOT_ENV):
        host_root = Path(os.environ[ROOT_ENV])
    if host_root is not None:
        return roots_at(host_root)
    return roots_from_mountinfo(mountinfo)


# ---- walking a tree -----------------------------------------------------------------------------


def walk_cgroups(root: Path, max_walk: int = MAX_WALK, max_depth: int = 64) -> Iterator[str]:
    """Cgroup directories under ``root`` (breadth first, sorted, root excluded) as ``/a/b``."""
    queue: deque[tuple[Path, str, int]] = deque([(root, "", 0)])
    visited = 0
    while queue and visited < max_walk:
        path, rel, depth = queue.popleft()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            visited += 1
            child = f"{rel}/{entry.name}"
            yield child
            if depth + 1 < max_depth:
                queue.append((Path(entry.path), child, depth + 1))
            if visited >= max_walk:
                return


def scan_tree(root: Path, limit: int = MAX_WALK) -> list[tuple[int, str]]:
    """(inode = cgroup id, path) of the root and its directories, at most ``limit`` of them.

    Pure (no shared state), so it runs in a worker thread."""
    out: list[tuple[int, str]] = []
    base = str(root)
    try:
        out.append((os.stat(base).st_ino, "/"))
    except OSError:
        return out
    for rel in walk_cgroups(root, max(0, limit - 1)):
        try:
            out.append((os.stat(base + rel).st_ino, rel))
        except OSError:
            continue  # removed while walking
    return out


# ---- /proc/<pid>/cgroup -------------------------------------------------------------------------


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """{hierarchy: path} from ``/proc/<pid>/cgroup``.

    Paths are relative to the *reader's* cgroup namespace: an agent in a container with a
    private cgroupns sees a host process as ``/../../kubepods.slice/...``. Such a path cannot be
    placed in the host tree, so that hierarchy is left out (unknown, never guessed); the kernel's
    cgroup ids, resolved by inode, do not have this problem.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not path.startswith("/") or ".." in path.split("/"):
            continue
        if ctrls == "":
            out.setdefault("unified", path)
            continue
        for name in ctrls.split(","):
            if name in ("memory", "cpu"):
                out.setdefault(name, path)
    return out
