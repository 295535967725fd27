"""What an observer asks the enrichment stage to add, and the facts a task's cgroups give.

An observer reports what the kernel said: a task's cgroup ids (container, storage, network), a
pid, or the path of a cgroup it watched (node). Per anomaly type it declares
(``Observer.enrichment``) which of these the agent's one enrichment stage turns into cgroup
facts (``tapio.agent.pipeline.Enricher``):

* :class:`ByCgroupId` — the occurrence carries ``cgroup2_id`` / ``memory_cgroup_id`` /
  ``cpu_cgroup_id`` facts; they become ``cgroup_path`` and ``cgroup_id`` (the id that describes
  the occurrence best, in the declared hierarchy order) plus the attribution facts. With
  ``proc_fallback`` an occurrence whose ``cgroup_source`` is ``"unknown"`` (the kernel did not
  see the task's own cgroups) is resolved through ``/proc/<pid>/cgroup`` while the process
  exists (``cgroup_source: "proc"``). With ``memory_limit`` a ``memory_limit_bytes`` the kernel
  did not report is read from the memory cgroup's limit file.
* :class:`ByCgroupPath` — the occurrence names a watched cgroup by path (``cgroup`` with
  ``scope: "cgroup"``) and/or a task by pid (``worst_pid`` → ``worst_cgroup``).

:func:`cgroup_facts` is the one rule for which cgroup describes a task best.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tapio.observers.cgroups.resolver import CgroupResolver
from tapio.observers.cgroups.roots import HIERARCHIES

#: The fact naming each hierarchy's cgroup id.
ID_KEYS = {"unified": "cgroup2_id", "memory": "memory_cgroup_id", "cpu": "cpu_cgroup_id"}


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
    #: ``hierarchies``' id facts of a ``data`` mapping in one C call (built once per spec;
    #: raises ``KeyError`` when one is missing, then :meth:`key_of` fills in 0).
    get_ids: Callable[[Mapping[str, Any]], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "get_ids", _id_getter(self.hierarchies))

    def key_of(self, type_: str, data: Mapping[str, Any]) -> tuple[object, object]:
        """The memo key of an occurrence: ``(type, ids)``, ``ids`` being the id facts of
        ``hierarchies`` as one C call returns them (the id itself for one hierarchy, else a
        tuple in order); an id the observer did not report is 0 (none)."""
        try:
            return (type_, self.get_ids(data))
        except KeyError:
            return memo_key(type_, [data.get(ID_KEYS[h], 0) for h in self.hierarchies])

    def ids_of(self, key: tuple[object, object]) -> dict[str, int]:
        """Hierarchy → cgroup id from a memo key (:meth:`key_of`)."""
        ids = key[1] if len(self.hierarchies) > 1 else (key[1],)
        return {h: int(v) for h, v in zip(self.hierarchies, ids, strict=True)}  # type: ignore[call-overload]


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


def memo_key(type_: str, ids: Sequence[object]) -> tuple[object, object]:
    """A memo key from ids in hierarchy order (as :meth:`ByCgroupId.key_of` makes it)."""
    return (type_, tuple(ids) if len(ids) > 1 else ids[0])
