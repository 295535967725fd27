"""Enrichment: the one stage between classification and fan-out that adds cgroup facts.

An observer reports what the kernel said: a task's cgroup ids (container, storage), a pid, or
the path of a cgroup it watched (node). The enricher adds what the node's own cgroup files say
about that cgroup: its path and the container id, runtime and pod UID the path names
(:mod:`tapio.observers.cgroups`). Keeping this out of the observers means one place resolves
cgroups for everyone, with one bounded cache, and a lookup that misses walks the hierarchy in a
worker thread instead of blocking the event loop that drains the rings.

Each observer declares per anomaly type what to enrich (``Observer.enrichment``):

* :class:`ByCgroupId` — the occurrence carries ``cgroup2_id`` / ``memory_cgroup_id`` /
  ``cpu_cgroup_id`` facts; they become ``cgroup_path`` and ``cgroup_id`` (the id that describes
  the occurrence best, in the declared hierarchy order) plus the attribution facts. With
  ``proc_fallback`` an occurrence whose ``cgroup_source`` is ``"unknown"`` (the kernel did not
  see the task's own cgroups) is resolved through ``/proc/<pid>/cgroup`` while the process
  exists (``cgroup_source: "proc"``). With ``memory_limit`` a ``memory_limit_bytes`` the kernel
  did not report is read from the memory cgroup's limit file.
* :class:`ByCgroupPath` — the occurrence names a watched cgroup by path (``cgroup`` with
  ``scope: "cgroup"``) and/or a task by pid (``worst_pid`` → ``worst_cgroup``).

Enrichment never costs the evidence: if it raises, the occurrence is delivered as classified
and ``tapio_enrichment_errors_total`` counts it.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from tapio.metrics import ENRICHMENT_ERRORS
from tapio.observers.cgroups import HIERARCHIES, CgroupResolver, Miss
from tapio.observers.cgroups.watch import CgroupWatcher
from tapio.occurrence import Occurrence, OccurrenceError

log = structlog.get_logger("tapio.observers.enrich")

#: The fact naming each hierarchy's cgroup id.
ID_KEYS = {"unified": "cgroup2_id", "memory": "memory_cgroup_id", "cpu": "cpu_cgroup_id"}
REFRESH_SECS = 10.0  # full re-index of the trees while some observer reports cgroup ids
MEMO_TTL_SECS = 5.0  # facts for one id tuple are reused this long (ids can be reused)
MEMO_SIZE = 4096


@functools.cache
def _id_getter(hierarchies: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Any]:
    return operator.itemgetter(*[ID_KEYS[h] for h in hierarchies])


@dataclass(frozen=True, slots=True)
class ByCgroupId:
    """Enrich from the task's cgroup ids (see the module docstring)."""

    hierarchies: tuple[str, ...]
    order: tuple[str, ...]
    proc_fallback: bool = False
    memory_limit: bool = False
    #: Re-renders ``error.message`` when enrichment filled in a fact the message shows.
    message: Callable[[Mapping[str, Any]], str] | None = None
    #: ``hierarchies``' id facts of a ``data`` mapping in one C call (built once per spec).
    _get: Callable[[Mapping[str, Any]], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_get", _id_getter(self.hierarchies))

    def ids_of(self, data: Mapping[str, Any]) -> tuple[object, ...]:
        """The id facts of ``hierarchies``, in order, in one C call (KeyError if one is absent)."""
        got = self._get(data)
        return got if len(self.hierarchies) > 1 else (got,)


@dataclass(frozen=True, slots=True)
class ByCgroupPath:
    """Enrich from a watched cgroup's path and/or a task's pid (see the module docstring)."""

    path_key: str = "cgroup"
    pid_key: str = "worst_pid"
    pid_path_key: str = "worst_cgroup"


Enrichment = ByCgroupId | ByCgroupPath


def cgroup_facts(
    resolver: CgroupResolver,
    ids: Mapping[str, int],
    paths: Mapping[str, str | None],
    order: tuple[str, ...],
    hierarchies: tuple[str, ...] = HIERARCHIES,
) -> dict[str, object]:
    """The ``data`` facts describing a task's cgroups.

    ``ids``/``paths`` are per hierarchy; ``order`` says which hierarchy describes the event
    best. ``cgroup_id`` is the id of the first hierarchy (in that order) where the task is not
    in the root, or of the first known id; ``cgroup_path`` is its path (``None`` when the cgroup
    is gone or unknown). Container id, runtime and pod UID are added only when a non-root path
    holds them, and then that path's hierarchy names ``cgroup_id``/``cgroup_path``.
    """
    facts: dict[str, object] = {ID_KEYS[h]: ids.get(h, 0) for h in hierarchies}
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
            facts.update(attr.facts())
            break
    facts["cgroup_path"] = cgroup_path
    return facts


def _ids(spec: ByCgroupId, key: tuple[object, ...]) -> dict[str, int]:
    """Hierarchy → cgroup id from a memo key ``(type, *ids in spec.hierarchies order)``."""
    return {h: int(v) for h, v in zip(spec.hierarchies, key[1:], strict=True)}  # type: ignore[call-overload]


class Enricher:
    """Adds cgroup facts to occurrences, per anomaly type, from one shared resolver."""

    def __init__(
        self,
        resolver: CgroupResolver,
        specs: Mapping[str, Enrichment],
        watcher: CgroupWatcher | None = None,
        *,
        watch: bool = True,
    ) -> None:
        """``watch=False`` leaves cgroups to the periodic re-index and miss walks alone."""
        self.resolver = resolver
        self.watcher: CgroupWatcher | None = None
        if watch:
            self.watcher = watcher if watcher is not None else CgroupWatcher(resolver)
        self.specs = dict(specs)
        self._memo: dict[tuple[object, ...], tuple[dict[str, object], str | None]] = {}
        self._memo_at = time.monotonic()
        #: data keys in arrival order → a dict of None with those keys sorted ({}: already are)
        self._orders: dict[tuple[str, ...], dict[str, Any]] = {}

    @classmethod
    def for_specs(
        cls, specs: Iterable[Mapping[str, Enrichment]], resolver: CgroupResolver | None = None
    ) -> Enricher:
        merged: dict[str, Enrichment] = {}
        for s in specs:
            merged.update(s)
        return cls(resolver if resolver is not None else CgroupResolver(), merged)

    @property
    def needs_ids(self) -> bool:
        return any(isinstance(s, ByCgroupId) for s in self.specs.values())

    async def run(self) -> None:
        """While ids are enriched: watch the cgroup trees (cgroups are learned when made and
        kept as tombstones for a while when removed), and re-index them now and every
        ``REFRESH_SECS`` as the safety net for what the watch does not see."""
        if not self.needs_ids:
            return
        async with anyio.create_task_group() as tg:
            if self.watcher is not None:
                tg.start_soon(self._watch, self.watcher)
            await self._reindex()

    async def _watch(self, watcher: CgroupWatcher) -> None:
        try:
            await watcher.run()
        except OSError as e:  # no inotify here: the periodic index still runs
            log.warning("cgroup watch unavailable; periodic re-index only", error=str(e))
        except Exception:  # a watch bug must not stop the pipeline
            log.exception("cgroup watch failed; periodic re-index only")

    async def _reindex(self) -> None:
        while True:
            try:
                await self.resolver.index()
            except Exception:  # an indexing bug must not stop the pipeline
                log.exception("cgroup index failed")
            await anyio.sleep(REFRESH_SECS)

    async def enrich(self, batch: Sequence[Occurrence]) -> None:
        """Enrich ``batch`` in place; ids the cache does not know are walked for off-loop.

        A batch under load is thousands of occurrences from a handful of cgroups, so the cache
        is asked once per distinct (type, ids) in the batch, not once per occurrence, and each
        occurrence then costs one memo lookup and one ``dict.update``.
        """
        fast: list[tuple[Occurrence, dict[str, Any], ByCgroupId, tuple[object, ...]]] = []
        todo: list[tuple[Occurrence, Enrichment, tuple[object, ...] | None]] = []
        seen: set[tuple[object, ...]] = set()
        missing: set[tuple[str, int]] = set()
        lookup = self.resolver.lookup
        specs = self.specs
        self._expire_memo()
        memo = self._memo
        for occ in batch:
            spec = specs.get(occ.type)
            data = occ.data
            if spec is None or data is None:
                continue
            if isinstance(spec, ByCgroupPath) or data.get("cgroup_source", "task") != "task":
                todo.append((occ, spec, None))
                continue
            try:
                key = (occ.type, *spec.ids_of(data))
            except KeyError:  # an id the observer did not report is 0 (none)
                key = (occ.type, *[data.get(ID_KEYS[h], 0) for h in spec.hierarchies])
            if spec.memory_limit:
                todo.append((occ, spec, key))
            else:
                hit = memo.get(key)  # memoized facts: every id was resolved
                if hit is not None:
                    facts = hit[0]
                    if facts.keys() <= data.keys():  # the hot path, see _update
                        data.update(facts)
                    else:
                        self._update(occ, data, facts)
                    continue
                fast.append((occ, data, spec, key))
            if key not in seen:
                seen.add(key)
                for h, cid in _ids(spec, key).items():
                    if isinstance(lookup(h, cid), Miss):
                        missing.add((h, cid))
        if not todo and not fast:
            return
        if missing:
            try:
                await self.resolver.resolve(missing)
            except Exception:  # unresolved ids are reported unknown below
                log.exception("cgroup walk failed")
        self._expire_memo()
        for occ, data, spec, key in fast:
            try:
                facts = self._memoized(spec, key)[0]
            except Exception:
                self._failed(occ)
            else:
                self._update(occ, data, facts)
        for occ, other, other_key in todo:
            try:
                if isinstance(other, ByCgroupPath):
                    self._by_path(occ, other)
                elif other_key is not None:
                    self._by_key(occ, other, other_key)
                else:
                    self._by_id(occ, other)
            except Exception:
                self._failed(occ)

    def _update(self, occ: Occurrence, data: dict[str, Any], facts: dict[str, object]) -> None:
        """The hot path: a task's own cgroup facts into ``data``. ``data`` arrives with its
        keys sorted (``new_occurrence``): facts that only overwrite keys it has keep that
        order, and only new keys need the sorted copy."""
        try:
            grows = not facts.keys() <= data.keys()
            data.update(facts)
            if grows:
                self._sort(occ, data)
        except Exception:
            self._failed(occ)

    @staticmethod
    def _failed(occ: Occurrence) -> None:
        ENRICHMENT_ERRORS.labels(observer=occ.observer).inc()
        log.exception("enrichment failed; occurrence kept as classified", type=occ.type)

    def _by_key(self, occ: Occurrence, spec: ByCgroupId, key: tuple[object, ...]) -> None:
        """A task's own cgroup ids with a memory limit to add: facts reused from the memo."""
        data = occ.data
        assert data is not None
        hit = self._memo.get(key)
        facts, mem_path = hit if hit is not None else self._memoized(spec, key)
        data.update(facts)
        self._limit(occ, data, spec, mem_path)
        self._sort(occ, data)

    def _sort(self, occ: Occurrence, data: dict[str, Any]) -> None:
        """Set ``occ.data`` to ``data`` with its keys sorted, as every encoder emits them.

        An occurrence type's keys are the same from one record to the next, so the sorted order
        is computed once per shape and kept as an empty template: a copy of it updated from
        ``data`` keeps the template's key order and costs a third of rebuilding the dict.
        """
        shape = tuple(data)
        template = self._orders.get(shape)
        if template is None:
            if len(self._orders) >= MEMO_SIZE:
                self._orders.clear()
            order = sorted(shape)
            template = self._orders[shape] = {} if order == list(shape) else dict.fromkeys(order)
        if template:
            sorted_data = template.copy()
            sorted_data.update(data)
            data = sorted_data
        occ.data = data

    def _by_id(self, occ: Occurrence, spec: ByCgroupId) -> None:
        """Ids the kernel could not read (``cgroup_source: unknown``): resolved through /proc."""
        data = occ.data
        assert data is not None
        r = self.resolver
        ids = {h: int(data.get(ID_KEYS[h], 0)) for h in spec.hierarchies}
        mem_path: str | None = None
        if spec.proc_fallback and data.get("cgroup_source") == "unknown":
            by_pid = r.paths_for_pid(int(data.get("pid", 0)))
            paths: dict[str, str | None] = {h: by_pid.get(h) for h in ids}
            if by_pid:
                data["cgroup_source"] = "proc"
                ids = {h: r.id_for_path(h, p) if p is not None else 0 for h, p in paths.items()}
            facts = cgroup_facts(r, ids, paths, spec.order, spec.hierarchies)
            mem_path = paths.get("memory")
        else:
            facts, mem_path = self._memoized(spec, (occ.type, *ids.values()))
        data.update(facts)
        self._limit(occ, data, spec, mem_path)
        self._sort(occ, data)

    def _limit(
        self, occ: Occurrence, data: dict[str, Any], spec: ByCgroupId, mem_path: str | None
    ) -> None:
        if spec.memory_limit and data.get("memory_limit_bytes") is None and mem_path is not None:
            limit = self.resolver.memory_limit(mem_path)
            if limit is not None:
                data["memory_limit_bytes"] = limit
                if spec.message is not None and occ.error is not None:
                    occ.error = OccurrenceError(occ.error.code, spec.message(data))

    def _expire_memo(self) -> None:
        # The same few cgroups produce most events; their facts are reused for a few seconds
        # so a cgroup that disappears (or an id that is reused) is not described stale for long.
        now = time.monotonic()
        if now - self._memo_at > MEMO_TTL_SECS or len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
            self._memo_at = now

    def _memoized(
        self, spec: ByCgroupId, key: tuple[object, ...]
    ) -> tuple[dict[str, object], str | None]:
        hit = self._memo.get(key)
        if hit is None:
            ids = _ids(spec, key)
            paths = {h: self.resolver.cached(h, cid) for h, cid in ids.items()}
            facts = cgroup_facts(self.resolver, ids, paths, spec.order, spec.hierarchies)
            hit = (facts, paths.get("memory"))
            if all(not isinstance(self.resolver.lookup(h, c), Miss) for h, c in ids.items()):
                self._memo[key] = hit
        return hit

    def _by_path(self, occ: Occurrence, spec: ByCgroupPath) -> None:
        data = occ.data
        assert data is not None
        r = self.resolver
        changed = False
        path = data.get(spec.path_key)
        if data.get("scope") == "cgroup" and isinstance(path, str):
            facts = r.attribution(path).facts()
            data.update(facts)
            changed = bool(facts)
        pid = data.get(spec.pid_key)
        if isinstance(pid, int) and pid > 0:
            paths = r.paths_for_pid(pid)
            p = paths.get("cpu") or paths.get("unified")
            if p is not None:
                data[spec.pid_path_key] = p
                data.update(r.attribution(p).facts())
                changed = True
        if changed:
            self._sort(occ, data)
