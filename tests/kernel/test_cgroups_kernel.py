"""The cgroup model against this machine's real cgroup2 tree.

The kernel names a cgroup by its id (``bpf_get_current_cgroup_id()`` and ``kn->id``), which is
the inode number of the cgroup's directory. These tests check that against the kernel itself
(``name_to_handle_at`` on a cgroup2 directory returns the id as its file handle) and show that
resolving by id does not depend on the reader's cgroup namespace while ``/proc/<pid>/cgroup``
does: a reader in a private cgroup namespace sees the process outside its namespace root.
Runs under the shared kernel lock (it creates and removes real cgroups).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapio.observers.cgroups import (
    CgroupResolver,
    discover_roots,
    parse_proc_cgroup,
    roots_at,
    roots_from_mountinfo,
)

MAX_HANDLE_SZ = 128
AT_FDCWD = -100


def kernel_cgroup_id(path: Path) -> int:
    """The id the kernel gives the cgroup at ``path``: its kernfs file handle (a u64)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("<Ii", buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    rc = libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    size, _type = struct.unpack_from("<Ii", buf, 0)
    assert size == 8, f"a kernfs handle is the 8-byte cgroup id, got {size} bytes"
    return int(struct.unpack_from("<Q", buf, 8)[0])


def cgroup2_root() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")  # fails under CI (tests/conftest.py)
    root = roots_from_mountinfo().unified
    if root is None or not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy mounted")
    assert root is not None
    return root


@contextlib.contextmanager
def cgroup_tree(root: Path, top: str) -> Iterator[Path]:
    """A test-owned cgroup subtree, removed deepest first (its processes killed) on exit."""
    base = root / top
    base.mkdir()
    try:
        yield base
    finally:
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
            deadline = time.monotonic() + 5
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


def test_a_cgroup2_directory_inode_is_the_kernels_cgroup_id() -> None:
    root = cgroup2_root()
    top = f"tapio-test-{os.getpid()}"
    rel = f"{top}/kubepods/pod0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f/{'c' * 64}"
    with cgroup_tree(root, top):
        cg = root / rel
        cg.mkdir(parents=True)
        cid = kernel_cgroup_id(cg)
        assert cid == os.stat(cg).st_ino
        # The configured host root (as an agent in a pod would mount it) finds it by id.
        host = root if (root / "cgroup.controllers").exists() else root.parent
        resolver = CgroupResolver(discover_roots(host))
        assert resolver.roots.unified == root
        path = resolver.path_for_id("unified", cid)
        assert path == f"/{rel}"
        attr = resolver.attribution(path)
        assert attr.container_id == "c" * 64 and attr.runtime == "containerd"
    assert CgroupResolver(roots_at(host), negative_ttl=0).path_for_id("unified", cid) is None


def test_resolution_by_id_does_not_depend_on_the_readers_cgroup_namespace() -> None:
    root = cgroup2_root()
    top = f"tapio-test-ns-{os.getpid()}"
    with cgroup_tree(root, top) as base:
        work, agent = base / "workload", base / "agent"
        work.mkdir()
        agent.mkdir()
        workload = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {work}/cgroup.procs && exec sleep 30"],
        )
        try:
            deadline = time.monotonic() + 5
            while str(workload.pid) not in (work / "cgroup.procs").read_text().split():
                assert time.monotonic() < deadline, "workload never joined its cgroup"
                time.sleep(0.01)
            # The "agent": moved into its own cgroup, then a private cgroup namespace rooted
            # there (what a pod gets), reading the workload's /proc entry.
            seen = subprocess.run(
                [
                    "sh",
                    "-c",
                    f"echo $$ > {agent}/cgroup.procs && "
                    f"exec unshare --cgroup cat /proc/{workload.pid}/cgroup",
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            ).stdout
            line = next(ln for ln in seen.splitlines() if ln.startswith("0::"))
            assert line == "0::/../workload"  # relative to the agent's namespace root
            assert "unified" not in parse_proc_cgroup(seen)  # cannot be placed: unknown
            # The kernel's id for the same cgroup resolves in the host tree regardless.
            resolver = CgroupResolver({"unified": root})
            assert resolver.path_for_id("unified", kernel_cgroup_id(work)) == f"/{top}/workload"
        finally:
            workload.kill()
            workload.wait(timeout=5)
