"""Container observer end to end: real OOM kills, real process exits, real cgroups.

The agent runs as a user would run it (``python -m tapio agent --observer container``); the
test's own children are identified by pid, since the host has other processes. Cgroups are
created under a test-owned directory in whatever layout the host has -- pure cgroup v2 (memory
limit in ``memory.max``, the memory controller delegated through ``cgroup.subtree_control``) or
hybrid (the v1 memory tree plus the controller-less cgroup2 tree) -- and removed on every exit
path.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cgroups import (
    cgroup_dirs,
    layout,
    memory_events,
    memory_peak,
    missing,
    set_memory_limit,
)
from .harness import AgentProcess, agent, require_kernel, wait_until

pytestmark = pytest.mark.kernel

OOM = "kernel.container.oom_kill"
EXIT = "kernel.container.abnormal_exit"
LIMIT = 64 << 20


@contextlib.contextmanager
def cgroup_dir(role: str, rel: str, controllers: tuple[str, ...] = ()) -> Iterator[Path]:
    """``rel`` in the hierarchy that plays ``role`` (on pure v2: the one cgroup2 tree)."""
    require_roles(role)
    with cgroup_dirs((role,), rel, controllers) as dirs:
        yield dirs[role]


def require_roles(*roles: str) -> None:
    if missing(roles):
        pytest.skip(f"no cgroup hierarchy for {', '.join(missing(roles))}")


def _mine(proc: AgentProcess, prefix: str, pid: int) -> list[dict[str, Any]]:
    return [o for o in proc.occurrences(prefix) if o["data"]["pid"] == pid]


def _sh(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL)


def _wait(p: subprocess.Popen[bytes], timeout: float = 30) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        raise


ALLOCATOR = """
import time
chunks = []
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    chunks.append(b"x" * (2 << 20))  # written, so every page is really resident
"""


def _kernel_oom_report(pid: int) -> dict[str, int] | None:
    """The kernel's own 'Killed process' line for ``pid`` (dmesg), if readable."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pat = re.compile(
        rf"Killed process {pid} \(.*?\) total-vm:(\d+)kB, anon-rss:(\d+)kB, "
        rf"file-rss:(\d+)kB, shmem-rss:(\d+)kB"
    )
    for line in reversed(out.splitlines()):
        m = pat.search(line)
        if m:
            total, anon, file, shmem = (int(x) for x in m.groups())
            return {"total_vm": total, "anon": anon, "file": file, "shmem": shmem}
    return None


def test_oom_kill_reports_the_victim_its_usage_cgroup_and_limit(tmp_path: Path) -> None:
    require_kernel(("container",))
    rel = f"tapio-test-{uuid.uuid4().hex[:8]}"
    with (
        cgroup_dir("memory", rel, ("memory",)) as cg,
        agent(
            tmp_path, observers=("container",), config='[container]\nexit_scope = "all"\n'
        ) as proc,
    ):
        set_memory_limit(cg, LIMIT)
        cg_ino = os.stat(cg).st_ino
        victim = subprocess.Popen(
            [
                "sh",
                "-c",
                f'echo $$ > {cg}/cgroup.procs && exec "$0" -c "$1"',
                sys.executable,
                ALLOCATOR,
            ]
        )
        rc = _wait(victim, 40)
        assert rc == -9, f"the allocator was not OOM-killed (rc={rc})"
        max_usage = memory_peak(cg, LIMIT)
        events = memory_events(cg)
        hits = wait_until(lambda: _mine(proc, OOM, victim.pid), 10)
        time.sleep(1.0)  # any (wrong) abnormal_exit for the victim would be in by now
        exits = _mine(proc, EXIT, victim.pid)
        hits = _mine(proc, OOM, victim.pid)

    assert events["oom_kill"] == 1, f"the kernel counted {events} for the cgroup"
    assert len(hits) == 1, f"expected exactly one oom_kill: {hits}"
    assert exits == [], f"the OOM victim's death was reported again: {exits}"
    occ = hits[0]
    d = occ["data"]
    assert occ["severity"] == "critical" and occ["outcome"] == "failure"
    assert occ["error"]["code"] == "OOM_KILL"
    assert d["comm"] == Path(sys.executable).name[:15] or d["comm"].startswith("python")
    assert d["signal"] == 9
    assert d["memory_cgroup_id"] == cg_ino
    assert d["cgroup_id"] == cg_ino, "cgroup_id must be the victim's memory cgroup (dir inode)"
    assert d["cgroup_path"] == f"/{rel}"
    assert d["memory_limit_bytes"] == LIMIT
    usage = d["memory_usage_bytes"]
    # At the kill the cgroup sits at its limit and nearly all of its charge is the victim's
    # resident memory (anonymous pages it wrote, plus the interpreter's file pages), so the
    # victim's RSS from the tracepoint must be within 10 % of the cgroup's peak usage. The
    # peak is read from the kernel, not computed by the agent, so the test cannot agree with a
    # wrong decoding of the tracepoint by construction.
    assert abs(usage - max_usage) <= 0.10 * max_usage, (usage, max_usage, d)
    assert usage == (d["anon_rss_kb"] + d["file_rss_kb"] + d["shmem_rss_kb"]) * 1024
    assert occ["error"]["message"] == (
        f"OOM kill pid={victim.pid} (usage={usage >> 20}MB, limit={LIMIT >> 20}MB)"
    )
    report = _kernel_oom_report(victim.pid)
    # the kernel's own log line carries the very same kB figures
    assert report is not None, f"no 'Killed process {victim.pid}' line in dmesg"
    assert d["anon_rss_kb"] == report["anon"]
    assert d["file_rss_kb"] == report["file"]
    assert d["shmem_rss_kb"] == report["shmem"]
    assert d["total_vm_kb"] == report["total_vm"]


EXIT_CONFIG = """
[container]
exit_scope = "all"
ignore_exit_codes = [42]
ignore_signals = [10]
"""

THREADS = """
import os, threading, time
ready = threading.Barrier(9)
def worker():
    ready.wait()
    time.sleep(30)
for _ in range(8):
    threading.Thread(target=worker, daemon=True).start()
ready.wait()
os._exit(7)
"""


def test_abnormal_exits_once_per_process_with_code_signal_and_ignore_lists(
    tmp_path: Path,
) -> None:
    require_kernel(("container",))
    with agent(tmp_path, observers=("container",), config=EXIT_CONFIG) as proc:
        code3 = _sh("exit 3")
        segv = _sh("ulimit -c 0; kill -SEGV $$")  # no core: a known core_dumped
        kill = _sh("kill -KILL $$")
        threads = subprocess.Popen([sys.executable, "-c", THREADS])
        ok = _sh("exit 0")
        ignored_code = _sh("exit 42")
        ignored_sig = _sh("kill -USR1 $$")
        children = [code3, segv, kill, threads, ok, ignored_code, ignored_sig]
        rcs = [_wait(p) for p in children]
        assert rcs == [3, -11, -9, 7, 0, 42, -10]
        reported = (code3, segv, kill, threads)
        wait_until(lambda: all(_mine(proc, EXIT, p.pid) for p in reported), 10)
        time.sleep(1.0)  # late duplicates (one per thread) would have arrived by now
        got = {p.pid: _mine(proc, EXIT, p.pid) for p in children}

    for p in reported:
        assert len(got[p.pid]) == 1, f"pid {p.pid}: {got[p.pid]}"
    for p in (ok, ignored_code, ignored_sig):
        assert got[p.pid] == [], f"pid {p.pid} must not be reported: {got[p.pid]}"

    c3 = got[code3.pid][0]
    assert c3["severity"] == "warning" and c3["outcome"] == "failure"
    assert c3["error"] == {
        "code": "ABNORMAL_EXIT",
        "message": f"Abnormal exit pid={code3.pid} (code=3, signal=0)",
    }
    assert c3["data"]["exit_code"] == 3 and c3["data"]["signal"] == 0
    assert c3["data"]["comm"] == "sh"

    sg = got[segv.pid][0]
    assert sg["severity"] == "error"
    assert sg["data"]["signal"] == 11 and sg["data"]["exit_code"] == 0
    assert sg["data"]["signal_name"] == "SIGSEGV"
    assert sg["data"]["core_dumped"] is False

    kl = got[kill.pid][0]
    assert kl["severity"] == "error" and kl["data"]["signal"] == 9
    assert kl["data"]["signal_name"] == "SIGKILL" and kl["data"]["core_dumped"] is False

    th = got[threads.pid][0]
    assert th["data"]["exit_code"] == 7 and th["data"]["signal"] == 0
    assert th["error"]["message"] == f"Abnormal exit pid={threads.pid} (code=7, signal=0)"
    for occ in (c3, sg, kl, th):
        for key in (
            "cgroup_id",
            "config_generation",
            "exit_code",
            "memory_limit_bytes",
            "memory_usage_bytes",
            "pid",
            "signal",
            "tid",
            "timestamp_ns",
        ):
            assert key in occ["data"], key


POD_UID = "0d5c1b0e-7a7f-4c39-9d4e-2b1f3c4d5e6f"
CID_SYSTEMD = "a" * 32 + "0123456789abcdef" * 2
CID_CGROUPFS = "b" * 32 + "fedcba9876543210" * 2


def _move_and_exit(paths: list[Path], code: int) -> subprocess.Popen[bytes]:
    moves = " && ".join(f"echo $$ > {p}/cgroup.procs" for p in paths)
    return _sh(f"{moves} && exit {code}")


def test_kubernetes_layouts_are_attributed_and_scope_filters_host_processes(
    tmp_path: Path,
) -> None:
    require_kernel(("container",))
    top = f"tapio-test-{uuid.uuid4().hex[:8]}"
    uid_ = POD_UID.replace("-", "_")
    systemd_rel = (
        f"{top}/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{uid_}.slice/cri-containerd-{CID_SYSTEMD}.scope"
    )
    cgroupfs_rel = f"{top}/kubepods/besteffort/pod{POD_UID}/{CID_CGROUPFS}"
    config = '[container]\nexit_scope = "containers"\n'
    require_roles("unified", "memory")
    lay = layout()
    with (
        # On pure v2 the memory and cpu controllers are delegated down to the container, as the
        # kubelet does: a task's memory cgroup is then its cgroup2 cgroup.
        cgroup_dirs(("unified", "memory"), systemd_rel, ("memory", "cpu")) as sd_dirs,
        cgroup_dirs(("memory",), cgroupfs_rel, ("memory", "cpu")) as fs_dirs,
        agent(tmp_path, observers=("container",), config=config) as proc,
    ):
        uni_sd, mem_fs = sd_dirs["unified"], fs_dirs["memory"]
        # On pure v2 both roles are one directory: the process is moved once.
        sd = _move_and_exit(list(dict.fromkeys(sd_dirs.values())), 5)
        fs = _move_and_exit([mem_fs], 6)
        # A host process: the root cgroup of every hierarchy the scope looks at.
        host = _move_and_exit(lay.roots(("memory", "unified", "cpu")), 9)
        assert [_wait(p) for p in (sd, fs, host)] == [5, 6, 9]
        wait_until(lambda: _mine(proc, EXIT, sd.pid) and _mine(proc, EXIT, fs.pid), 10)
        time.sleep(1.0)
        got_sd, got_fs = _mine(proc, EXIT, sd.pid), _mine(proc, EXIT, fs.pid)
        got_host = _mine(proc, EXIT, host.pid)
        uni_ino, fs_ino = os.stat(uni_sd).st_ino, os.stat(mem_fs).st_ino

    assert got_host == [], f"scope 'containers' must drop a root-cgroup process: {got_host}"
    assert len(got_sd) == 1 and len(got_fs) == 1, (got_sd, got_fs)
    d = got_sd[0]["data"]
    assert d["container_id"] == CID_SYSTEMD
    assert d["container_runtime"] == "containerd"
    assert d["pod_uid"] == POD_UID
    assert d["cgroup_path"] == "/" + systemd_rel
    assert d["cgroup_id"] == uni_ino and d["cgroup2_id"] == uni_ino
    d = got_fs[0]["data"]
    assert d["container_id"] == CID_CGROUPFS
    assert d["container_runtime"] == "containerd"
    assert d["pod_uid"] == POD_UID
    assert d["cgroup_path"] == "/" + cgroupfs_rel
    assert d["cgroup_id"] == fs_ino and d["memory_cgroup_id"] == fs_ino
