"""Attribution from local kernel facts: cgroup id → cgroup path → container id, runtime, pod UID.

No Kubernetes API here (contract §3): pod names and namespaces are the controller's job. The
kernel reports cgroup ids (the inode of the cgroup's directory in its hierarchy; ids are per
hierarchy, so the same number can name different cgroups in the cgroup2 tree and in a v1
controller's tree). :class:`CgroupResolver` maps ``(hierarchy, id)`` to the cgroup path by walking
that hierarchy's mount once per miss and remembering every directory it saw, in a bounded LRU;
misses are remembered in a bounded negative cache for a short time. A cgroup that is gone is
unknown (``None``), never guessed, and there is no fallback to ``/proc/1/cgroup``.

:func:`parse_container` turns a cgroup path into ``(container_id, runtime, pod_uid)``:

* containerd ``cri-containerd-<64hex>.scope`` (systemd driver) or a bare ``<64hex>`` directory
  below ``kubepods`` (cgroupfs driver; containerd is the only CRI runtime using that layout today);
* cri-o ``crio-<64hex>.scope`` (or ``crio-<64hex>`` with the cgroupfs driver);
* docker ``docker-<64hex>.scope`` or ``/docker/<64hex>``;
* a systemd unit ``<name>.service`` / ``<name>.scope`` → runtime ``systemd``, id = unit name;
* the pod UID from ``pod<uid>`` (cgroupfs) or ``kubepods[-<qos>]-pod<uid_with_underscores>.slice``
  (systemd), for the burstable, besteffort and guaranteed (no QoS directory) classes.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

HIERARCHIES = ("unified", "memory", "cpu")

_HEX64 = r"[0-9a-f]{64}"
_CONTAINER_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_HEX64})(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),
)
_BARE_ID = re.compile(rf"^({_HEX64})$")
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
_POD_SYSTEMD = re.compile(
    r"^kubepods(?:-(?:burstable|besteffort|guaranteed))?-pod"
    r"([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice$"
)
_UNIT = re.compile(r"^([A-Za-z0-9:_.@\\-]+)\.(service|scope)$")

U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_UNLIMITED_FLOOR = 1 << 62  # v1 reports "unlimited" as a huge page-aligned number


@dataclass(frozen=True, slots=True)
class Attribution:
    container_id: str | None
    runtime: str | None
    pod_uid: str | None


NO_ATTRIBUTION = Attribution(None, None, None)


def parse_container(path: str) -> Attribution:
    """Container id, runtime and pod UID from a cgroup path (relative to its hierarchy root)."""
    parts = [p for p in path.split("/") if p]
    pod_uid: str | None = None
    in_kubepods = False
    for p in parts:
        if p == "kubepods" or p.startswith("kubepods.") or p.startswith("kubepods-"):
            in_kubepods = True
        m = _POD_CGROUPFS.match(p)
        if m:
            pod_uid = m.group(1)
            continue
        m = _POD_SYSTEMD.match(p)
        if m:
            pod_uid = m.group(1).replace("_", "-")
    # The deepest component that names a container wins.
    for i in range(len(parts) - 1, -1, -1):
        p = parts[i]
        for pattern, runtime in _CONTAINER_PATTERNS:
            m = pattern.match(p)
            if m:
                return Attribution(m.group(1), runtime, pod_uid)
        m = _BARE_ID.match(p)
        if m:
            if i > 0 and parts[i - 1] == "docker":
                return Attribution(m.group(1), "docker", pod_uid)
            if in_kubepods:
                return Attribution(m.group(1), "containerd", pod_uid)
    for i in range(len(parts) - 1, -1, -1):
        m = _UNIT.match(parts[i])
        if m:
            return Attribution(parts[i], "systemd", pod_uid)
    return Attribution(None, None, pod_uid)


def discover_roots(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, Path]:
    """The mount point of each hierarchy we attribute with: cgroup2 ("unified") and the v1
    memory and cpu controllers (on a pure cgroup2 host those are the cgroup2 mount)."""
    roots: dict[str, Path] = {}
    v2: Path | None = None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return roots
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
                if ctrl in opts and ctrl not in roots:
                    roots[ctrl] = mnt
    if v2 is not None:
        roots["unified"] = v2
        try:
            controllers = (v2 / "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
        for ctrl in ("memory", "cpu"):
            if ctrl in controllers and ctrl not in roots:
                roots[ctrl] = v2
    return roots


class _LRU:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: OrderedDict[tuple[str, int], str] = OrderedDict()

    def get(self, key: tuple[str, int]) -> str | None:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: str) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.maxsize:
            self.data.popitem(last=False)


class CgroupResolver:
    """Bounded, memoized cgroup id → path resolution over injectable hierarchy roots."""

    def __init__(
        self,
        roots: Mapping[str, Path] | None = None,
        *,
        proc: Path = Path("/proc"),
        cache_size: int = 4096,
        negative_size: int = 4096,
        negative_ttl: float = 2.0,
        max_walk: int = 65536,
    ) -> None:
        self.roots = dict(roots) if roots is not None else discover_roots()
        self.proc = proc
        self._cache = _LRU(cache_size)
        self._negative: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._negative_size = negative_size
        self._negative_ttl = negative_ttl
        self._max_walk = max_walk
        self._attr_cache: OrderedDict[str, Attribution] = OrderedDict()
        self._attr_size = cache_size
        self.walks = 0  # directory walks done (tests assert memoization)

    # ---- id → path -------------------------------------------------------------------------
    def path_for_id(self, hierarchy: str, cgroup_id: int) -> str | None:
        """The cgroup's path (``/`` for the root) or None when unknown or gone."""
        if cgroup_id == 0:
            return None
        root = self.roots.get(hierarchy)
        if root is None:
            return None
        key = (str(root), cgroup_id)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        now = time.monotonic()
        neg = self._negative.get(key)
        if neg is not None and now - neg < self._negative_ttl:
            return None
        found = self._walk(root, cgroup_id)
        if found is None:
            self._negative[key] = now
            self._negative.move_to_end(key)
            while len(self._negative) > self._negative_size:
                self._negative.popitem(last=False)
            return None
        self._negative.pop(key, None)
        return found

    def _walk(self, root: Path, wanted: int) -> str | None:
        self.walks += 1
        found: str | None = None
        for ino, rel in scan_tree(root, self._max_walk):
            self._cache.put((str(root), ino), rel)
            if ino == wanted:
                found = rel
        return found

    def distinct_roots(self) -> list[Path]:
        return list({str(p): p for p in self.roots.values()}.values())

    def merge(self, root: Path, entries: Iterable[tuple[int, str]]) -> None:
        """Remember a scan made elsewhere (e.g. in a worker thread by :func:`scan_tree`)."""
        rkey = str(root)
        for ino, rel in entries:
            self._cache.put((rkey, ino), rel)
            self._negative.pop((rkey, ino), None)

    def id_for_path(self, hierarchy: str, path: str) -> int:
        root = self.roots.get(hierarchy)
        if root is None:
            return 0
        try:
            ino = os.stat(str(root) + path).st_ino
        except OSError:
            return 0
        self._cache.put((str(root), ino), path)
        return ino

    # ---- pid → paths ----------------------------------------------------------------------
    def paths_for_pid(self, pid: int) -> dict[str, str]:
        """``/proc/<pid>/cgroup`` as {hierarchy: path} for the hierarchies we know; {} if gone."""
        try:
            text = (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return {}
        out = parse_proc_cgroup(text)
        unified = self.roots.get("unified")
        for ctrl in ("memory", "cpu"):
            # Pure cgroup2: the controllers live in the unified tree ("0::" line only).
            if ctrl not in out and "unified" in out and self.roots.get(ctrl) == unified:
                out[ctrl] = out["unified"]
        return out

    # ---- path → container ----------------------------------------------------------------
    def attribution(self, path: str) -> Attribution:
        hit = self._attr_cache.get(path)
        if hit is None:
            hit = parse_container(path)
            self._attr_cache[path] = hit
            if len(self._attr_cache) > self._attr_size:
                self._attr_cache.popitem(last=False)
        return hit

    # ---- memory limit ----------------------------------------------------------------------
    def memory_limit(self, path: str) -> int | None:
        """The memory cgroup's limit in bytes (U64_MAX when unlimited), None if unreadable."""
        root = self.roots.get("memory")
        if root is None:
            return None
        base = str(root) + path.rstrip("/")
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                raw = Path(base + "/" + name).read_text().strip()
            except OSError:
                continue
            if raw == "max":
                return U64_MAX
            try:
                value = int(raw)
            except ValueError:
                return None
            return U64_MAX if value >= _UNLIMITED_FLOOR else value
        return None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """{hierarchy: path} from ``/proc/<pid>/cgroup``.

    Paths are relative to the *reader's* cgroup namespace: an agent in a container with a
    private cgroupns sees a host process as ``/../../kubepods.slice/...``. Such a path cannot be
    placed in the host tree we walk, so that hierarchy is left out (unknown, never guessed).
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
        names: Iterable[str] = ctrls.split(",")
        for name in names:
            if name in ("memory", "cpu"):
                out.setdefault(name, path)
    return out


def scan_tree(root: Path, limit: int = 65536) -> list[tuple[int, str]]:
    """(inode, path) of every directory of one cgroup hierarchy, at most ``limit`` of them.

    Pure (no shared state), so it can run in a worker thread."""
    out: list[tuple[int, str]] = []
    stack: list[tuple[str, str]] = [(str(root), "/")]
    while stack and len(out) < limit:
        abs_dir, rel = stack.pop()
        try:
            ino = os.stat(abs_dir).st_ino
        except OSError:
            continue
        out.append((ino, rel))
        try:
            with os.scandir(abs_dir) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, rel.rstrip("/") + "/" + entry.name))
        except OSError:
            continue
    return out


def cgroup_facts(
    resolver: CgroupResolver,
    ids: Mapping[str, int],
    paths: Mapping[str, str | None],
    order: tuple[str, ...],
) -> dict[str, object]:
    """The ``data`` facts describing a task's cgroups.

    ``ids``/``paths`` are per hierarchy ("unified", "memory", "cpu"); ``order`` says which
    hierarchy describes the event best. ``cgroup_id`` is the id of the first hierarchy (in that
    order) where the task is not in the root, or of the first known id; ``cgroup_path`` is its
    path (``None`` when the cgroup is gone or unknown). Container id, runtime and pod UID are
    added only when a non-root path holds them.
    """
    facts: dict[str, object] = {
        "cgroup2_id": ids.get("unified", 0),
        "memory_cgroup_id": ids.get("memory", 0),
        "cpu_cgroup_id": ids.get("cpu", 0),
    }
    primary: str | None = None
    for h in order:
        p = paths.get(h)
        if p is not None and p != "/":
            primary = h
            break
    if primary is None:
        for h in order:
            if ids.get(h):
                primary = h
                break
    facts["cgroup_id"] = ids.get(primary, 0) if primary is not None else 0
    cgroup_path = paths.get(primary) if primary is not None else None
    for h in order:
        p = paths.get(h)
        if p is None or p == "/":
            continue
        attr = resolver.attribution(p)
        if attr.container_id is not None or attr.pod_uid is not None:
            cgroup_path = p
            facts["cgroup_id"] = ids.get(h, 0)
            if attr.container_id is not None:
                facts["container_id"] = attr.container_id
                facts["container_runtime"] = attr.runtime
            if attr.pod_uid is not None:
                facts["pod_uid"] = attr.pod_uid
            break
    facts["cgroup_path"] = cgroup_path
    return facts
