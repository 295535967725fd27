"""Learn cgroups when they are created: an inotify watch on each cgroup tree (see the package).

A container runtime removes a workload's cgroup as soon as its last process is reaped
(``ctr run --rm``; kubelet/containerd on real nodes). The exit or OOM evidence of that
workload is enriched a little later, when the directory is gone and a walk can no longer find
it. So the resolver learns a cgroup's ``(id, path)`` at ``mkdir`` time from ``IN_CREATE`` on
its parent, and when ``IN_DELETE`` on the parent says the directory is gone (cgroupfs does
not report ``IN_DELETE_SELF``: a kernfs directory's inode keeps its link count at ``rmdir``)
it keeps the path as a tombstone for a few minutes (:meth:`CgroupResolver.forget`) instead
of dropping it.

The watch is driven by the anyio loop (``wait_readable`` on the inotify fd; no thread), one
watch per cgroup directory, at most ``max_watches`` of them over all trees. When the bound (or
the kernel's ``max_user_watches``) bites, the directory is left unwatched and counted
(``tapio_cgroup_watch_limit_total``); the periodic re-index still finds cgroups below it that
live longer than its period. A host without inotify (or a tree that cannot be watched) keeps
the periodic re-index only.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from tapio.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    parse_events,
)
from tapio.metrics import CGROUP_INDEX_EVENTS, CGROUP_WATCH_LIMIT
from tapio.observers.cgroups.resolver import CgroupResolver
from tapio.observers.cgroups.roots import MAX_WALK

log = structlog.get_logger("tapio.observers.cgroups.watch")

#: What each watched cgroup directory reports: subdirectories made/removed/renamed, itself gone.
WATCH_MASK = IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVED_TO | IN_ONLYDIR
MAX_WATCHES = 16384
MAX_SUBTREE = 256  # directories scanned inline under one new cgroup (made before its watch)


@dataclass(frozen=True, slots=True)
class _Watched:
    root: Path
    rel: str  # "/" for the root, else "/a/b"
    ino: int


class CgroupWatcher:
    """Feeds a :class:`CgroupResolver` from inotify: adds on create, tombstones on delete."""

    def __init__(
        self,
        resolver: CgroupResolver,
        *,
        max_watches: int = MAX_WATCHES,
        inotify: Inotify | None = None,
    ) -> None:
        self.resolver = resolver
        self.max_watches = max_watches
        self._inotify = inotify
        self._watched: dict[int, _Watched] = {}
        self._wd_by_path: dict[tuple[str, str], int] = {}
        self.limit_hits = 0
        self._adds = CGROUP_INDEX_EVENTS.labels(event="add")
        self._removes = CGROUP_INDEX_EVENTS.labels(event="remove")
        self._limit = CGROUP_WATCH_LIMIT

    @property
    def watches(self) -> int:
        return len(self._watched)

    def start(self) -> list[tuple[Path, int, str]]:
        """Open inotify and watch every tree; the cgroups seen, for :meth:`learn_all`.

        Blocking (a walk of each tree, at most ``MAX_WALK`` directories): :meth:`run` calls it
        in a worker thread, and it touches nothing the event loop reads."""
        if self._inotify is None:
            self._inotify = Inotify()
        out: list[tuple[Path, int, str]] = []
        for root in self.resolver.roots.distinct():
            out.extend((root, ino, rel) for ino, rel in self._watch_tree(root, "/", MAX_WALK))
        return out

    def learn_all(self, seen: list[tuple[Path, int, str]]) -> None:
        for root, ino, rel in seen:
            self.resolver.learn(root, ino, rel)
        self._adds.inc(len(seen))

    async def run(self) -> None:
        """Watch the trees and handle events until cancelled; closes the fd on every exit."""
        try:
            self.learn_all(await anyio.to_thread.run_sync(self.start))
            assert self._inotify is not None
            while True:
                await anyio.wait_readable(self._inotify.fd)
                self.handle(self._inotify.read())
        finally:
            if self._inotify is not None:
                self._inotify.close()

    def handle(self, buf: bytes) -> None:
        for ev in parse_events(buf):
            if ev.mask & IN_Q_OVERFLOW:
                # Events were lost: the periodic re-index catches up with what we missed.
                log.warning("cgroup inotify queue overflowed; relying on the periodic index")
                continue
            w = self._watched.get(ev.wd)
            if w is None:
                continue
            if ev.mask & IN_DELETE and ev.mask & IN_ISDIR and ev.name:
                child = self._wd_by_path.get((str(w.root), _join(w.rel, ev.name)))
                if child is not None:
                    self._removed(child)
            elif ev.mask & IN_DELETE_SELF:
                self._removed(ev.wd)
            elif ev.mask & IN_IGNORED:
                self._drop(ev.wd)
            elif ev.mask & (IN_CREATE | IN_MOVED_TO) and ev.mask & IN_ISDIR and ev.name:
                rel = _join(w.rel, ev.name)
                seen = self._watch_tree(w.root, rel, MAX_SUBTREE)
                self.learn_all([(w.root, ino, r) for ino, r in seen])

    def _removed(self, wd: int) -> None:
        """A watched cgroup directory is gone: tombstone it and free its watch."""
        w = self._drop(wd)
        if w is None:
            return
        if self.resolver.forget(w.root, w.ino):
            self._removes.inc()
        assert self._inotify is not None
        self._inotify.rm_watch(wd)

    def _drop(self, wd: int) -> _Watched | None:
        w = self._watched.pop(wd, None)
        if w is not None and self._wd_by_path.get((str(w.root), w.rel)) == wd:
            del self._wd_by_path[(str(w.root), w.rel)]
        return w

    def _watch_tree(self, root: Path, rel: str, limit: int) -> list[tuple[int, str]]:
        """Learn and watch ``rel`` and (up to ``limit``) the directories already below it.

        The watch is placed before the directory is listed, so a child made in between is
        reported by inotify or found by the listing (possibly both; learning is idempotent).
        """
        stack = [rel]
        seen: list[tuple[int, str]] = []
        base = str(root)
        while stack:
            cur = stack.pop()
            full = base if cur == "/" else base + cur
            try:
                ino = os.stat(full).st_ino
            except OSError:
                continue  # gone already: nothing to learn
            seen.append((ino, cur))
            self._add_watch(root, cur, full, ino)
            if len(seen) >= limit:
                break
            try:
                with os.scandir(full) as it:
                    subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            prefix = "" if cur == "/" else cur
            stack.extend(f"{prefix}/{n}" for n in sorted(subdirs, reverse=True))
        return seen

    def _add_watch(self, root: Path, rel: str, full: str, ino: int) -> None:
        assert self._inotify is not None
        if len(self._watched) >= self.max_watches:
            self._limit_hit()
            return
        try:
            wd = self._inotify.add_watch(full, WATCH_MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:  # the kernel's max_user_watches
                self._limit_hit()
            return
        old = self._watched.get(wd)
        if old is not None:  # the same directory again (inotify returns its existing watch)
            self._wd_by_path.pop((str(old.root), old.rel), None)
        self._watched[wd] = _Watched(root, rel, ino)
        self._wd_by_path[(str(root), rel)] = wd

    def _limit_hit(self) -> None:
        self.limit_hits += 1
        self._limit.inc()


#: The full re-index of the trees while some observer reports cgroup ids: the safety net for
#: what the (bounded) watch does not see.
REFRESH_SECS = 10.0


async def keep_indexed(resolver: CgroupResolver, watcher: CgroupWatcher | None) -> None:
    """Keep ``resolver`` current until cancelled: ``watcher`` learns cgroups as they are made
    (and keeps removed ones as tombstones for a while), and the trees are re-indexed now and
    every ``REFRESH_SECS``. Neither failing stops the other, nor the agent's data path."""
    async with anyio.create_task_group() as tg:
        if watcher is not None:
            tg.start_soon(_watch, watcher)
        while True:
            try:
                await resolver.index()
            except Exception:  # an indexing bug must not stop the pipeline
                log.exception("cgroup index failed")
            await anyio.sleep(REFRESH_SECS)


async def _watch(watcher: CgroupWatcher) -> None:
    try:
        await watcher.run()
    except OSError as e:  # no inotify here: the periodic index still runs
        log.warning("cgroup watch unavailable; periodic re-index only", error=str(e))
    except Exception:  # a watch bug must not stop the pipeline
        log.exception("cgroup watch failed; periodic re-index only")


def _join(parent: str, name: str) -> str:
    return ("" if parent == "/" else parent) + "/" + name
