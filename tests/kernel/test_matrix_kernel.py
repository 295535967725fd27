"""The agent as installed -- default observers, no flags -- on whatever kernel runs the test.

The kernel matrix (scripts/kernel-matrix.sh) runs this first on every kernel: all four observers
must start and run, and the only anomaly types a kernel may leave out are the documented ones
(docs/operations.md, "Kernel support"). What the agent reported is written to
``$TAPIO_MATRIX_REPORT/status.json`` when that is set, so the support table is measured, not
written by hand.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from .harness import agent, require_kernel, wait_until

pytestmark = pytest.mark.kernel

OBSERVERS = ("network", "storage", "node", "container")
# Anomaly types a kernel may lack, with the capability that explains it. Today: the IPC signal
# needs a hardware PMU, which VMs (this CI and the matrix's QEMU guests) do not expose.
DOCUMENTED_UNSUPPORTED = {"kernel.node.ipc_degradation": "pmu"}


def test_default_agent_runs_all_four_observers(tmp_path: Path) -> None:
    require_kernel(OBSERVERS)
    with agent(tmp_path, observers=()) as a:
        status_file = a.data_dir / ".tapio-agent-status"

        def all_reported() -> dict[str, dict[str, object]] | None:
            try:
                obs = json.loads(status_file.read_text())["observers"]
            except (OSError, ValueError, KeyError):
                return None
            return obs if set(OBSERVERS) <= set(obs) else None

        observers = wait_until(all_reported, 30, interval=0.25)
        assert observers, f"no status for all observers:\n{a.stderr()[-3000:]}"
        logs = a.logs()

    report = os.environ.get("TAPIO_MATRIX_REPORT")
    if report:
        Path(report, "status.json").write_text(
            json.dumps({"kernel": platform.release(), "observers": observers}, indent=2)
        )
    for name in OBSERVERS:
        st = observers[name]
        assert st["state"] == "running", (name, st)
        unsupported = dict(st.get("unsupported", {}))
        for anomaly in unsupported:
            assert anomaly in DOCUMENTED_UNSUPPORTED, (name, anomaly, unsupported[anomaly])
            cap = DOCUMENTED_UNSUPPORTED[anomaly]
            assert st.get("capabilities", {}).get(cap) is False, (name, cap, st)
    failed = [e for e in logs if e.get("level") in ("error", "critical")]
    assert failed == [], failed
