"""A workload whose cgroup is removed as soon as it exits is still attributed.

Container runtimes remove a workload's cgroup right after its last process is reaped
(``ctr run --rm``; kubelet/containerd on real nodes), before the exit evidence is enriched.
The agent learns cgroups when they are made (inotify) and keeps removed ones as tombstones, so
the occurrence keeps its cgroup path, container id and pod UID. The test makes a pod-shaped
cgroup2 directory, runs a process in it that exits with code 3, and removes the pod's cgroups
the moment the process is reaped.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .cgroups import cgroup_dirs, missing, rmdir_cgroup
from .harness import agent, require_kernel, wait_until

pytestmark = pytest.mark.kernel

EXIT = "kernel.container.abnormal_exit"
POD_UID = "6a1f0c9e-2b3d-4e5f-8a7b-1c2d3e4f5a6b"
CID = "d" * 32 + "0123456789abcdef" * 2
CONFIG = (
    '[container]\nexit_scope = "containers"\n'
    '[metrics]\nenabled = true\nport = 0\nbind_address = "127.0.0.1"\n'
)


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_cgroup_removed_right_after_its_process_exits_keeps_its_attribution(
    tmp_path: Path,
) -> None:
    require_kernel(("container",))
    if missing(("unified",)):
        pytest.skip("no cgroup2 hierarchy")
    top = f"tapio-test-{uuid.uuid4().hex[:8]}"
    uid_ = POD_UID.replace("-", "_")
    pod_rel = f"{top}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice"
    rel = f"{pod_rel}/cri-containerd-{CID}.scope"
    with agent(tmp_path, observers=("container",), config=CONFIG) as proc:
        # The watch is in place once the agent has indexed the existing tree.
        adds = 'tapio_cgroup_index_events_total{event="add"}'
        assert wait_until(lambda: _metric(proc.metrics_text(), adds) > 0, 10)
        with cgroup_dirs(("unified",), rel) as dirs:
            leaf = dirs["unified"]
            ino = leaf.stat().st_ino
            p = subprocess.Popen(
                ["sh", "-c", f"echo $$ > {leaf}/cgroup.procs && exit 3"],
                stdout=subprocess.DEVNULL,
            )
            try:
                rc = p.wait(30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            # Reaped: remove the container's and the pod's cgroups at once, as a runtime does.
            top_dir = leaf.parents[len(Path(rel).parts) - 2]
            assert top_dir.name == top
            rmdir_cgroup(top_dir)
            gone = not leaf.exists()
        assert rc == 3 and gone
        wait_until(lambda: [o for o in proc.occurrences(EXIT) if o["data"]["pid"] == p.pid], 10)
        time.sleep(0.5)  # a duplicate would be in by now
        got = [o for o in proc.occurrences(EXIT) if o["data"]["pid"] == p.pid]
        metrics = proc.metrics_text()

    assert len(got) == 1, got
    d = got[0]["data"]
    assert d["exit_code"] == 3, d
    assert d["cgroup_path"] == "/" + rel, d
    assert d["cgroup2_id"] == ino and d["cgroup_id"] == ino, d
    assert d["container_id"] == CID and d["container_runtime"] == "containerd", d
    assert d["pod_uid"] == POD_UID, d
    # The removal was seen by the watch (the test's five directories at least).
    assert _metric(metrics, 'tapio_cgroup_index_events_total{event="remove"}') >= 5, metrics
