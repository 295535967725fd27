"""The cgroup id index learns cgroups when they are made (inotify on a fake tree in tmp_path)
and keeps removed ones as tombstones, bounded in count and age; the watch itself is bounded
and counts when the bound bites, leaving the periodic re-index as the safety net."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tapio.agent.pipeline import Enricher
from tapio.inotify import IN_CREATE, IN_DELETE_SELF, IN_ISDIR, Event, parse_events
from tapio.metrics import REGISTRY
from tapio.observers.cgroups import MISS, ByCgroupId, CgroupResolver, cgroup_facts
from tapio.observers.cgroups.watch import CgroupWatcher

CID = "c" * 64
UID = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f"
POD = f"/kubepods/burstable/pod{UID}"


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def tree(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "unified").mkdir()
    return {"unified": tmp_path / "unified"}


async def until(pred: Callable[[], object], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


# ---- tombstones ---------------------------------------------------------------------------------


def test_a_removed_cgroup_stays_resolvable_until_its_tombstone_expires(tmp_path: Path) -> None:
    roots = tree(tmp_path)
    r = CgroupResolver(roots, tombstone_ttl=0.2)
    r.learn(roots["unified"], 77, "/a")
    r.forget(roots["unified"], 77)
    assert r.tombstones == 1
    before = sample("tapio_cgroup_tombstone_hits_total")
    assert r.cached("unified", 77) == "/a"
    assert sample("tapio_cgroup_tombstone_hits_total") - before == 1
    time.sleep(0.25)
    assert r.lookup("unified", 77) is None  # expired: gone, not guessed, and not walked for
    assert r.tombstones == 0


def test_tombstones_are_bounded_in_count_oldest_first(tmp_path: Path) -> None:
    roots = tree(tmp_path)
    r = CgroupResolver(roots, tombstone_size=2)
    for cid in (1, 2, 3):
        r.learn(roots["unified"], cid, f"/c{cid}")
        r.forget(roots["unified"], cid)
    assert r.tombstones == 2
    assert r.lookup("unified", 1) is MISS  # evicted: a walk decides (and will not find it)
    assert r.lookup("unified", 2) == "/c2" and r.lookup("unified", 3) == "/c3"


def test_forgetting_an_unknown_cgroup_makes_no_tombstone(tmp_path: Path) -> None:
    roots = tree(tmp_path)
    r = CgroupResolver(roots)
    r.forget(roots["unified"], 5)
    assert r.tombstones == 0 and r.lookup("unified", 5) is MISS


def test_learning_clears_a_negative_answer(tmp_path: Path) -> None:
    roots = tree(tmp_path)
    r = CgroupResolver(roots, negative_ttl=60)
    r.merge(roots["unified"], [], wanted=[9])
    assert r.lookup("unified", 9) is None
    r.learn(roots["unified"], 9, "/late")
    assert r.lookup("unified", 9) == "/late"


# ---- the inotify records ------------------------------------------------------------------------


def test_parse_events_reads_padded_names() -> None:
    name = b"pod1\0\0\0\0\0\0\0\0\0\0\0\0"
    buf = struct.pack("iIII", 3, IN_CREATE | IN_ISDIR, 0, len(name)) + name
    buf += struct.pack("iIII", 4, IN_DELETE_SELF, 0, 0)
    assert list(parse_events(buf)) == [
        Event(3, IN_CREATE | IN_ISDIR, "pod1"),
        Event(4, IN_DELETE_SELF, ""),
    ]
    assert list(parse_events(buf[:10])) == []  # a torn record is not invented


# ---- the watch on a real (tmpfs) tree -----------------------------------------------------------


async def test_a_cgroup_made_and_removed_between_indexes_is_still_resolved(
    tmp_path: Path,
) -> None:
    roots = tree(tmp_path)
    u = roots["unified"]
    (u / "kubepods").mkdir()
    r = CgroupResolver(roots)
    w = CgroupWatcher(r)
    adds = sample("tapio_cgroup_index_events_total", {"event": "add"})
    removes = sample("tapio_cgroup_index_events_total", {"event": "remove"})
    async with anyio.create_task_group() as tg:
        tg.start_soon(w.run)
        await until(lambda: w.watches == 2)  # the root and /kubepods
        leaf = u / POD.lstrip("/") / CID
        leaf.mkdir(parents=True)  # three levels at once: some made before their parent's watch
        ino = os.stat(leaf).st_ino
        await until(lambda: r.lookup("unified", ino) == f"{POD}/{CID}")
        leaf.rmdir()
        await until(lambda: r.tombstones == 1)
        tg.cancel_scope.cancel()
    assert r.walks == 0  # learned from the watch alone, never walked for
    assert r.cached("unified", ino) == f"{POD}/{CID}"
    assert sample("tapio_cgroup_index_events_total", {"event": "add"}) - adds >= 5
    assert sample("tapio_cgroup_index_events_total", {"event": "remove"}) - removes == 1
    assert w._inotify is not None and w._inotify.fd == -1  # closed on cancellation


async def test_the_watch_bound_is_counted_and_the_periodic_index_still_finds(
    tmp_path: Path,
) -> None:
    roots = tree(tmp_path)
    u = roots["unified"]
    for d in ("a", "b", "c"):
        (u / d).mkdir()
    r = CgroupResolver(roots)
    w = CgroupWatcher(r, max_watches=2)
    hits = sample("tapio_cgroup_watch_limit_total")
    async with anyio.create_task_group() as tg:
        tg.start_soon(w.run)
        await until(lambda: w.limit_hits == 2)  # root and /a watched; /b and /c are not
        assert w.watches == 2
        (u / "c" / "x").mkdir()  # below an unwatched directory: not seen by the watch
        await anyio.sleep(0.1)
        ino = os.stat(u / "c" / "x").st_ino
        assert r.lookup("unified", ino) is MISS
        await r.index()  # the safety net
        assert r.lookup("unified", ino) == "/c/x"
        (u / "a" / "y").mkdir()  # below a watched one: learned, but no watch left for it
        ino_y = os.stat(u / "a" / "y").st_ino
        await until(lambda: r.lookup("unified", ino_y) == "/a/y")
        assert w.watches == 2
        tg.cancel_scope.cancel()
    assert sample("tapio_cgroup_watch_limit_total") - hits == w.limit_hits == 3


async def test_the_enricher_runs_the_watch_and_attributes_a_removed_container(
    tmp_path: Path,
) -> None:
    roots = tree(tmp_path)
    r = CgroupResolver(roots)
    spec = ByCgroupId(("unified",), ("unified",))
    e = Enricher(r, {"t": spec})
    async with anyio.create_task_group() as tg:
        tg.start_soon(e.run)
        assert e.watcher is not None
        await until(lambda: e.watcher is not None and e.watcher.watches == 1)
        leaf = roots["unified"] / POD.lstrip("/") / CID
        leaf.mkdir(parents=True)
        ino = os.stat(leaf).st_ino
        await until(lambda: r.lookup("unified", ino) is not MISS)
        for d in (leaf, leaf.parent, leaf.parent.parent, leaf.parent.parent.parent):
            d.rmdir()  # the runtime removes the container, then the kubelet the pod
        await until(lambda: r.tombstones == 4)
        tg.cancel_scope.cancel()
    paths = {"unified": r.cached("unified", ino)}
    facts = cgroup_facts(r, {"unified": ino}, paths, ("unified",), ("unified",))
    assert facts["cgroup_path"] == f"{POD}/{CID}"
    assert facts["container_id"] == CID and facts["pod_uid"] == UID


def test_no_inotify_leaves_the_periodic_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = tree(tmp_path)
    r = CgroupResolver(roots)
    e = Enricher(r, {"t": ByCgroupId(("unified",), ("unified",))})

    def broken() -> object:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("tapio.observers.cgroups.watch.Inotify", broken)
    (roots["unified"] / "a").mkdir()
    ino = os.stat(roots["unified"] / "a").st_ino

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(e.run)
            await until(lambda: r.lookup("unified", ino) == "/a")  # the index, not the watch
            assert e.watcher is not None and e.watcher.watches == 0
            tg.cancel_scope.cancel()

    anyio.run(main)
