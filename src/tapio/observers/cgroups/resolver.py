"""cgroup id ↔ path over one set of hierarchy roots, memoized and bounded (see the package)."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import anyio
import anyio.to_thread

from tapio.metrics import CGROUP_LOOKUPS, CGROUP_TOMBSTONE_HITS
from tapio.observers.cgroups.containers import Attribution, parse_container
from tapio.observers.cgroups.roots import (
    MAX_WALK,
    U64_MAX,
    UNLIMITED_FLOOR,
    CgroupRoots,
    discover_roots,
    parse_proc_cgroup,
    scan_tree,
)


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


class Miss:
    """The cache cannot answer yet: a walk of the hierarchy is needed (see ``resolve``)."""


MISS = Miss()

Scan = Callable[[Path, int], list[tuple[int, str]]]


class CgroupResolver:
    """Bounded, memoized cgroup id → path resolution over one set of hierarchy roots."""

    def __init__(
        self,
        roots: CgroupRoots | Mapping[str, Path] | None = None,
        *,
        proc: Path = Path("/proc"),
        cache_size: int = 4096,
        negative_size: int = 4096,
        negative_ttl: float = 2.0,
        max_walk: int = MAX_WALK,
        scan: Scan = scan_tree,
        tombstone_size: int = 4096,
        tombstone_ttl: float = 300.0,
    ) -> None:
        if roots is None:
            roots = discover_roots()
        self.roots = roots if isinstance(roots, CgroupRoots) else CgroupRoots.from_mapping(roots)
        self.proc = proc
        self._cache = _LRU(cache_size)
        self._negative: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._negative_size = negative_size
        self._negative_ttl = negative_ttl
        self._max_walk = max_walk
        self._scan = scan
        self._attr_cache: OrderedDict[str, Attribution] = OrderedDict()
        self._attr_size = cache_size
        # Removed cgroups, still answered by id for ``tombstone_ttl`` (kernel cgroup ids are
        # not reused, so a late event for a removed cgroup cannot name a newer one).
        self._tombstones: OrderedDict[tuple[str, int], tuple[str, float]] = OrderedDict()
        self._tombstone_size = tombstone_size
        self._tombstone_ttl = tombstone_ttl
        self._tombstone_hits = CGROUP_TOMBSTONE_HITS
        self._walk_lock: anyio.Lock | None = None
        self.walks = 0  # directory walks done (tests assert memoization)
        self._hits = CGROUP_LOOKUPS.labels(result="hit")
        self._misses = CGROUP_LOOKUPS.labels(result="miss")
        self._unknown = CGROUP_LOOKUPS.labels(result="unknown")

    # ---- id → path: the cache, then a walk -------------------------------------------------
    def lookup(self, hierarchy: str, cgroup_id: int) -> str | Miss | None:
        """The cached answer: a path, ``None`` (no such cgroup, or none to look for) or MISS."""
        if cgroup_id == 0:
            return None
        root = self.roots.get(hierarchy)
        if root is None:
            return None
        return self.lookup_root(root, cgroup_id)

    def path_for_id(self, hierarchy: str, cgroup_id: int) -> str | None:
        """Blocking lookup (walks inline on a miss): for worker threads and tools, never the
        event loop; the agent uses :meth:`lookup` and :meth:`resolve`."""
        found = self.lookup(hierarchy, cgroup_id)
        if not isinstance(found, Miss):
            return found
        root = self.roots.get(hierarchy)
        assert root is not None
        self._misses.inc()
        self.walks += 1
        self.merge(root, self._scan(root, self._max_walk), wanted=[cgroup_id])
        return self._cache.get((str(root), cgroup_id))

    async def resolve(self, wanted: Iterable[tuple[str, int]]) -> None:
        """Walk the trees of ``wanted`` ids that missed, in a worker thread, one walk at a time;
        afterwards :meth:`lookup` answers them (a path, or None for a cgroup that is gone)."""
        by_root: dict[str, tuple[Path, list[int]]] = {}
        for hierarchy, cid in wanted:
            if not isinstance(self.lookup(hierarchy, cid), Miss):
                continue
            root = self.roots.get(hierarchy)
            assert root is not None
            by_root.setdefault(str(root), (root, []))[1].append(cid)
        if not by_root:
            return
        if self._walk_lock is None:
            self._walk_lock = anyio.Lock()
        async with self._walk_lock:
            for root, ids in by_root.values():
                self._misses.inc(len(ids))
                # Another caller's walk may have answered while we waited for the lock.
                still = [c for c in ids if isinstance(self.lookup_root(root, c), Miss)]
                if not still:
                    continue
                self.walks += 1
                entries = await anyio.to_thread.run_sync(self._scan, root, self._max_walk)
                self.merge(root, entries, wanted=still)

    def lookup_root(self, root: Path, cgroup_id: int) -> str | Miss | None:
        key = (str(root), cgroup_id)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        tomb = self._tombstones.get(key)
        if tomb is not None:
            if time.monotonic() - tomb[1] < self._tombstone_ttl:
                return tomb[0]
            del self._tombstones[key]
            return None  # removed long ago: gone
        neg = self._negative.get(key)
        if neg is not None and time.monotonic() - neg < self._negative_ttl:
            return None
        return MISS

    def cached(self, hierarchy: str, cgroup_id: int) -> str | None:
        """The path when known now (counted as a hit, or as unknown when not found)."""
        found = self.lookup(hierarchy, cgroup_id)
        if isinstance(found, str):
            self._hits.inc()
            root = self.roots.get(hierarchy)
            if root is not None and (str(root), cgroup_id) in self._tombstones:
                self._tombstone_hits.inc()
            return found
        if cgroup_id != 0 and self.roots.get(hierarchy) is not None:
            self._unknown.inc()
        return None

    def merge(
        self, root: Path, entries: Iterable[tuple[int, str]], wanted: Iterable[int] = ()
    ) -> None:
        """Remember a walk's (id, path) pairs; ``wanted`` ids it did not see are gone."""
        rkey = str(root)
        for ino, rel in entries:
            self._cache.put((rkey, ino), rel)
            self._negative.pop((rkey, ino), None)
        now = time.monotonic()
        for cid in wanted:
            key = (rkey, cid)
            if self._cache.get(key) is None:
                self._negative[key] = now
                self._negative.move_to_end(key)
                while len(self._negative) > self._negative_size:
                    self._negative.popitem(last=False)

    def learn(self, root: Path, cgroup_id: int, path: str) -> None:
        """A cgroup seen now (made, or found by a watch): resolvable from this moment on."""
        key = (str(root), cgroup_id)
        self._cache.put(key, path)
        self._negative.pop(key, None)
        self._tombstones.pop(key, None)

    def forget(self, root: Path, cgroup_id: int) -> bool:
        """A cgroup was removed: keep its path as a tombstone (bounded in count and age) so
        the evidence of its last processes, enriched a little later, is still attributed."""
        key = (str(root), cgroup_id)
        path = self._cache.data.pop(key, None)
        if path is None:
            return False
        self._tombstones[key] = (path, time.monotonic())
        self._tombstones.move_to_end(key)
        while len(self._tombstones) > self._tombstone_size:
            self._tombstones.popitem(last=False)
        return True

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    async def index(self) -> None:
        """Walk every tree once (in a worker thread) so that a cgroup removed right after its
        last process died is still known when its event is enriched."""
        for root in self.roots.distinct():
            entries = await anyio.to_thread.run_sync(self._scan, root, self._max_walk)
            self.merge(root, entries)

    def id_for_path(self, hierarchy: str, path: str) -> int:
        """The cgroup id of ``path`` (one ``stat``), 0 when it is gone."""
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
        unified = self.roots.unified
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
        root = self.roots.memory
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
            return U64_MAX if value >= UNLIMITED_FLOOR else value
        return None
