"""Network evidence names the connecting task's cgroup, like container and storage evidence.

A refusal is seen in softirq context, where ``current`` is whatever ran there; the kernel side
records the connecting task's cgroup ids at connect() and the agent's enrichment stage turns them
into the cgroup path and the container and pod it names. The client runs in a pod-shaped cgroup
made in every hierarchy this host has (one directory on pure cgroup2; unified, memory and cpu on
a hybrid host), so each id is checked against the directory the kernel really put it in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ..ports import closed_port
from .cgroups import cgroup_dirs, layout, missing
from .harness import agent, require_kernel, wait_until
from .podcg import ROLES, pod_cgroup_rel

pytestmark = pytest.mark.kernel

CLIENTS = str(Path(__file__).with_name("net_clients.py"))
POD_UID = "3c9b2a1d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"
CID = "e" * 32 + "0123456789abcdef" * 2
REFUSED = "kernel.network.connection_refused"


def test_a_refused_connect_carries_the_connecting_tasks_cgroup_and_pod(tmp_path: Path) -> None:
    require_kernel(("network",))
    if missing(ROLES):
        pytest.skip(f"no cgroup hierarchy for {missing(ROLES)}")
    rel = pod_cgroup_rel(POD_UID, CID)
    port = closed_port(socket.AF_INET, "127.0.0.1")
    # On cgroup2 a controller's cgroup is the nearest ancestor that enables it: delegate both
    # down to the leaf so every id names the leaf, as a kubelet-made pod cgroup does.
    with cgroup_dirs(ROLES, rel, ("memory", "cpu")) as dirs, agent(tmp_path) as a:
        procs = " ".join(f"{d}/cgroup.procs" for d in {str(p) for p in dirs.values()})
        cmd = [sys.executable, CLIENTS, "refuse", "tapio-cgrefuse", "127.0.0.1", str(port), "3"]
        join = f'for f in {procs}; do echo $$ > "$f" || exit 9; done; exec "$@"'
        client = subprocess.Popen(
            ["sh", "-c", join, "sh", *cmd],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0 and out.split() == ["3"]

        def mine() -> list[dict[str, Any]]:
            return [o for o in a.occurrences(REFUSED) if o["data"]["dst_port"] == port]

        wait_until(lambda: len(mine()) >= 3, 20)
        time.sleep(0.5)  # a duplicate would be in by now
        occs = mine()
        ino = {role: os.stat(d).st_ino for role, d in dirs.items()}

    assert len(occs) == 3, occs
    for o in occs:
        d = o["data"]
        assert d["pid"] == client.pid and d["pid_source"] == "connect", d
        assert d["cgroup2_id"] == ino["unified"], d
        assert d["memory_cgroup_id"] == ino["memory"], d
        assert d["cpu_cgroup_id"] == ino["cpu"], d
        # The unified hierarchy comes first; on pure cgroup2 all three are the same directory.
        assert d["cgroup_id"] == ino["unified"], d
        assert d["cgroup_path"] == f"/{rel}", d
        assert d["container_id"] == CID and d["container_runtime"] == "containerd", d
        assert d["pod_uid"] == POD_UID, d
    if not layout().v2:
        assert len(set(ino.values())) == 3  # three hierarchies really were checked
