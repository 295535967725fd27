from __future__ import annotations

import io
from pathlib import Path

from tapio.cli.main import main
from tapio.status import AgentStatus, ObserverStatus, read_status, write_status

NOW = 1_800_000_000 * 1_000_000_000


def run(d: Path, *args: str, code: int = 0) -> str:
    out = io.StringIO()
    assert main(["health", *args, "--data-dir", str(d)], stdout=out, clock=lambda: NOW) == code
    return out.getvalue()


def test_status_file_adds_unsupported_and_failed_lines(tmp_path: Path) -> None:
    write_status(
        tmp_path,
        AgentStatus(
            written_at_unix=NOW / 1e9 - 3,
            pid=1,
            node_name="n",
            config_generation=4,
            observers={
                "node": ObserverStatus(
                    state="running",
                    degraded_reasons=["no_pmu"],
                    capabilities={"pmu": False},
                    unsupported={"kernel.node.ipc_degradation": "no hardware PMU"},
                ),
                "storage": ObserverStatus(state="failed", error="attach failed"),
            },
        ),
    )
    # a failed observer makes the node not healthy (exit 1) even without any anomaly
    text = run(tmp_path, code=1)
    assert "agent: generation 4, status 3s old" in text
    assert "  node: kernel.node.ipc_degradation unsupported: no hardware PMU" in text
    assert "  node: degraded: no_pmu" in text
    assert "  storage: failed (attach failed)" in text
    only_node = run(tmp_path, "node")  # node itself runs (no PMU is not a failure): 0
    assert "storage" not in only_node.split("agent:")[1]


def test_no_status_file_leaves_the_table_alone(tmp_path: Path) -> None:
    assert "agent:" not in run(tmp_path)
    (tmp_path / ".tapio-agent-status").write_text("{garbage")
    assert read_status(tmp_path) is None
    assert "agent:" not in run(tmp_path)
