"""The cgroup model: cgroup paths → container id / runtime / pod UID, root discovery (hybrid,
pure cgroup2, a configured host root), and id → path resolution over a fake cgroup tree
(injectable roots), with bounded positive and negative caches."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tapio.metrics import REGISTRY
from tapio.observers.cgroups import (
    MISS,
    U64_MAX,
    Attribution,
    CgroupResolver,
    CgroupRoots,
    cgroup_facts,
    discover_roots,
    parse_container,
    parse_proc_cgroup,
    roots_at,
    roots_from_mountinfo,
    scan_tree,
    walk_cgroups,
)

CID = "0123456789abcdef" * 4
UID = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # systemd cgroup driver, containerd, the three QoS classes
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope",
            Attribution(CID, "containerd", UID),
        ),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope",
            Attribution(CID, "containerd", UID),
        ),
        (
            f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
            Attribution(CID, "containerd", UID),
        ),
        # cgroupfs driver
        (f"/kubepods/burstable/pod{UID}/{CID}", Attribution(CID, "containerd", UID)),
        (f"/kubepods/besteffort/pod{UID}/{CID}", Attribution(CID, "containerd", UID)),
        (f"/kubepods/pod{UID}/{CID}", Attribution(CID, "containerd", UID)),
        # cri-o, both drivers
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"crio-{CID}.scope",
            Attribution(CID, "cri-o", UID),
        ),
        (f"/kubepods/burstable/pod{UID}/crio-{CID}", Attribution(CID, "cri-o", UID)),
        # docker
        (f"/system.slice/docker-{CID}.scope", Attribution(CID, "docker", None)),
        (f"/docker/{CID}", Attribution(CID, "docker", None)),
        # systemd units
        ("/system.slice/nginx.service", Attribution("nginx.service", "systemd", None)),
        (
            "/user.slice/user-0.slice/session-3.scope",
            Attribution("session-3.scope", "systemd", None),
        ),
        # a pod-level cgroup: pod UID but no container
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
            Attribution(None, None, UID),
        ),
        # nothing to attribute, or not quite a container id
        ("/", Attribution(None, None, None)),
        ("/process_api/51c269fd0b1a8103f111a7407b6924b3", Attribution(None, None, None)),
        (f"/somewhere/{CID}", Attribution(None, None, None)),  # bare hex outside kubepods
        (f"/kubepods/burstable/pod{UID}/{CID[:-1]}", Attribution(None, None, UID)),
        # not a docker id (upper case): still a systemd scope, never a docker container
        (
            f"/system.slice/docker-{CID.upper()}.scope",
            Attribution(f"docker-{CID.upper()}.scope", "systemd", None),
        ),
    ],
)
def test_parse_container(path: str, expected: Attribution) -> None:
    assert parse_container(path) == expected


def test_the_deepest_container_component_wins() -> None:
    other = "f" * 64
    path = f"/system.slice/docker-{other}.scope/kubepods/pod{UID}/{CID}"
    assert parse_container(path) == Attribution(CID, "containerd", UID)


def _tree(tmp_path: Path) -> dict[str, Path]:
    roots = {h: tmp_path / h for h in ("unified", "memory", "cpu")}
    for r in roots.values():
        r.mkdir()
    return roots


def test_resolver_maps_ids_to_paths_per_hierarchy(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    a = roots["memory"] / "kubepods" / "burstable" / f"pod{UID}" / CID
    a.mkdir(parents=True)
    b = roots["unified"] / "system.slice" / "x.service"
    b.mkdir(parents=True)
    r = CgroupResolver(roots, proc=tmp_path / "proc")
    ino_a, ino_b = os.stat(a).st_ino, os.stat(b).st_ino
    assert r.path_for_id("memory", ino_a) == f"/kubepods/burstable/pod{UID}/{CID}"
    assert r.path_for_id("unified", ino_b) == "/system.slice/x.service"
    # ids are per hierarchy: the memory cgroup's id is not looked up in the cgroup2 tree
    assert r.path_for_id("unified", ino_a) is None
    assert r.path_for_id("memory", os.stat(roots["memory"]).st_ino) == "/"
    assert r.path_for_id("memory", 0) is None
    assert r.path_for_id("nonexistent", ino_a) is None


def test_one_walk_indexes_the_whole_tree(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    dirs = [roots["memory"] / f"g{i}" for i in range(20)]
    for d in dirs:
        d.mkdir()
    r = CgroupResolver(roots)
    for d in dirs:
        assert r.path_for_id("memory", os.stat(d).st_ino) == "/" + d.name
    assert r.walks == 1


def test_negative_cache_is_bounded_in_time(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    r = CgroupResolver(roots, negative_ttl=0.2)
    late = roots["memory"] / "late"
    late.mkdir()
    ino = os.stat(late).st_ino
    late.rmdir()
    assert r.path_for_id("memory", ino) is None
    assert r.path_for_id("memory", ino) is None
    assert r.walks == 1  # the miss was remembered
    late.mkdir()  # the same inode may or may not be reused; look the new one up
    new_ino = os.stat(late).st_ino
    time.sleep(0.25)
    assert r.path_for_id("memory", new_ino) == "/late"


def test_a_gone_cgroup_is_unknown_not_guessed(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    gone = roots["memory"] / "gone"
    gone.mkdir()
    ino = os.stat(gone).st_ino
    gone.rmdir()
    r = CgroupResolver(roots)
    assert r.path_for_id("memory", ino) is None
    facts = cgroup_facts(r, {"unified": 0, "memory": ino, "cpu": 0}, {"memory": None}, ("memory",))
    assert facts["cgroup_path"] is None
    assert "container_id" not in facts and "pod_uid" not in facts
    assert facts["cgroup_id"] == ino  # the kernel's id is still a fact


def test_positive_cache_is_bounded(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    for i in range(10):
        (roots["memory"] / f"g{i}").mkdir()
    r = CgroupResolver(roots, cache_size=4)
    r.path_for_id("memory", os.stat(roots["memory"] / "g0").st_ino)
    assert len(r._cache.data) <= 4


def test_proc_cgroup_hybrid_and_pure_v2(tmp_path: Path) -> None:
    hybrid = "9:name=systemd:/\n4:memory:/kubepods/x\n1:cpu,cpuacct:/kubepods/y\n0::/\n"
    assert parse_proc_cgroup(hybrid) == {
        "memory": "/kubepods/x",
        "cpu": "/kubepods/y",
        "unified": "/",
    }
    v2 = tmp_path / "v2"
    v2.mkdir()
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("0::/kubepods.slice/a.scope\n")
    r = CgroupResolver({"unified": v2, "memory": v2, "cpu": v2}, proc=proc)
    assert r.paths_for_pid(42) == {
        "unified": "/kubepods.slice/a.scope",
        "memory": "/kubepods.slice/a.scope",
        "cpu": "/kubepods.slice/a.scope",
    }
    assert r.paths_for_pid(43) == {}  # gone: nothing, and never /proc/1


def test_memory_limit_files(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    for name, content in (("v2", "max\n"), ("v1", "9223372036854771712\n"), ("set", "67108864\n")):
        d = roots["memory"] / name
        d.mkdir()
        fname = "memory.max" if name == "v2" else "memory.limit_in_bytes"
        (d / fname).write_text(content)
    r = CgroupResolver(roots)
    assert r.memory_limit("/v2") == U64_MAX
    assert r.memory_limit("/v1") == U64_MAX
    assert r.memory_limit("/set") == 64 << 20
    assert r.memory_limit("/missing") is None


def test_discover_roots_from_mountinfo(tmp_path: Path) -> None:
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("")
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {v2} rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert discover_roots(mountinfo=mi) == CgroupRoots(
        cpu=Path("/sys/fs/cgroup/cpu"), memory=Path("/sys/fs/cgroup/memory"), unified=v2
    )
    pure = tmp_path / "pure"
    pure.mkdir()
    (pure / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mi.write_text(f"30 23 0:26 / {pure} rw - cgroup2 cgroup2 rw\n")
    assert discover_roots(mountinfo=mi) == CgroupRoots(unified=pure, memory=pure, cpu=pure)


def test_proc_cgroup_outside_our_cgroup_namespace_is_unknown() -> None:
    # An agent with a private cgroupns reading a host process: the path climbs out of the
    # namespace root and cannot be placed in the host tree, so it is not used.
    text = "4:memory:/../../kubepods/x\n0::/../../kubepods.slice/a.scope\n1:cpu:/..foo/ok\n"
    assert parse_proc_cgroup(text) == {"cpu": "/..foo/ok"}


# ---- roots: mountinfo, a configured host root, pure cgroup2 and hybrid layouts ------------------


def test_discover_roots_hybrid_mountinfo(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
        "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "33 25 0:29 /sub /mnt/cpu rw - cgroup cgroup rw,cpu\n"  # not a tree's root: ignored
    )
    roots = roots_from_mountinfo(mi)
    assert roots == CgroupRoots(
        unified=Path("/sys/fs/cgroup/unified"),
        memory=Path("/sys/fs/cgroup/memory"),
        cpu=Path("/sys/fs/cgroup/cpu,cpuacct"),
    )
    assert roots.cpu_v1 == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert len(roots.distinct()) == 3
    mi.write_text("30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    pure = roots_from_mountinfo(mi)
    assert pure.unified == Path("/sys/fs/cgroup") and pure.cpu_v1 is None
    assert roots_from_mountinfo(tmp_path / "missing") == CgroupRoots()


def _pure_v2(base: Path) -> Path:
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (base / "cgroup.procs").write_text("")
    return base


def test_roots_at_a_pure_cgroup2_host_root(tmp_path: Path) -> None:
    host = _pure_v2(tmp_path / "host" / "sys" / "fs" / "cgroup")
    roots = roots_at(host)
    assert roots == CgroupRoots(unified=host, memory=host, cpu=host)
    assert roots.cpu_v1 is None and roots.distinct() == [host]


def test_roots_at_a_hybrid_host_root(tmp_path: Path) -> None:
    host = tmp_path / "cgroup"
    for name in ("unified", "memory", "cpu,cpuacct"):
        (host / name).mkdir(parents=True)
        (host / name / "cgroup.procs").write_text("")
    (host / "unified" / "cgroup.controllers").write_text("")  # controller-less cgroup2
    roots = roots_at(host)
    assert roots == CgroupRoots(
        unified=host / "unified", memory=host / "memory", cpu=host / "cpu,cpuacct"
    )
    assert roots.cpu_v1 == host / "cpu,cpuacct"
    assert roots_at(tmp_path / "nothing") == CgroupRoots()


def test_a_configured_root_wins_over_mountinfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _pure_v2(tmp_path / "host-cgroup")
    mi = tmp_path / "mountinfo"
    mi.write_text("30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert discover_roots(host, mountinfo=mi).unified == host
    monkeypatch.setenv("TAPIO_CGROUP_ROOT", str(host))
    assert discover_roots(mountinfo=mi).unified == host
    monkeypatch.delenv("TAPIO_CGROUP_ROOT")
    assert discover_roots(mountinfo=mi).unified == Path("/sys/fs/cgroup")


def test_ids_resolve_in_the_host_tree_whatever_our_cgroup_namespace(tmp_path: Path) -> None:
    """An agent in a pod: /proc shows host cgroups outside its namespace (unknown), but the
    kernel's cgroup id is the directory's inode in the host tree, which is always found."""
    host = _pure_v2(tmp_path / "host" / "sys" / "fs" / "cgroup")
    rel = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    scope = host / rel / f"cri-containerd-{CID}.scope"
    scope.mkdir(parents=True)
    proc = tmp_path / "proc"
    (proc / "321").mkdir(parents=True)
    (proc / "321" / "cgroup").write_text(f"0::/../../{rel}/cri-containerd-{CID}.scope\n")
    r = CgroupResolver(roots_at(host), proc=proc)
    assert r.paths_for_pid(321) == {}  # outside our namespace: never guessed
    path = r.path_for_id("unified", os.stat(scope).st_ino)
    assert path == f"/{rel}/cri-containerd-{CID}.scope"
    assert r.attribution(path) == Attribution(CID, "containerd", UID)
    assert r.path_for_id("memory", os.stat(scope).st_ino) == path  # pure v2: one tree


# ---- walking, and misses resolved off the event loop --------------------------------------------


def test_walk_is_bounded_and_breadth_first(tmp_path: Path) -> None:
    for p in ("a/b/c/d", "e", "f/g"):
        (tmp_path / p).mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    assert list(walk_cgroups(tmp_path)) == ["/a", "/e", "/f", "/a/b", "/f/g", "/a/b/c", "/a/b/c/d"]
    assert list(walk_cgroups(tmp_path, max_walk=2)) == ["/a", "/e"]
    assert list(walk_cgroups(tmp_path, max_depth=1)) == ["/a", "/e", "/f"]
    scanned = scan_tree(tmp_path, limit=3)
    assert scanned[0] == (os.stat(tmp_path).st_ino, "/")
    assert scanned[1:] == [
        (os.stat(tmp_path / "a").st_ino, "/a"),
        (os.stat(tmp_path / "e").st_ino, "/e"),
    ]


def misses() -> float:
    return REGISTRY.get_sample_value("tapio_cgroup_lookups_total", {"result": "miss"}) or 0.0


async def test_resolve_walks_in_a_worker_thread_once_and_counts_misses(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    a, b = roots["unified"] / "a", roots["unified"] / "b"
    a.mkdir()
    b.mkdir()
    threads: list[int] = []

    def scan(root: Path, limit: int) -> list[tuple[int, str]]:
        threads.append(threading.get_ident())
        return scan_tree(root, limit)

    r = CgroupResolver(roots, scan=scan)
    ia, ib = os.stat(a).st_ino, os.stat(b).st_ino
    assert r.lookup("unified", ia) is MISS
    before = misses()
    await r.resolve([("unified", ia), ("unified", ib), ("unified", 999_999_999)])
    assert misses() - before == 3 and r.walks == 1
    assert threads and threads[0] != threading.get_ident()  # not the event loop's thread
    assert r.lookup("unified", ia) == "/a" and r.lookup("unified", ib) == "/b"
    assert r.lookup("unified", 999_999_999) is None  # gone: remembered as unknown
    await r.resolve([("unified", ia), ("unified", 999_999_999)])
    assert r.walks == 1  # answered from the caches
