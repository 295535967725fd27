"""The file sink on a full filesystem: every occurrence counted once, no temporary file left,
and writing resumes when space returns -- with the real agent, real BPF and real refusals.

The agent's data directory is a 256 KiB tmpfs; about 3,000 refused connects produce far more
occurrence files than fit. ``/metrics`` must then show, for the file sink,
``ok + dropped == tapio_anomalies_total`` exactly, the directory must hold exactly ``ok``
complete JSON files and no ``.tmp`` file, and after freeing space the next refusals are written.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..ports import closed_port as held_closed_port
from ..ports import refuse
from .harness import AgentProcess, agent, require_kernel, wait_until

pytestmark = pytest.mark.kernel

REFUSALS = 3000


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path``; unmounted even when the test fails."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tapio-full-test", str(path)],
        check=True,
        capture_output=True,
        timeout=10,
    )
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=10)
        if done.returncode != 0:  # still busy (an agent that did not exit): detach it anyway
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def file_sink_counts(proc: AgentProcess, port: int) -> dict[str, float]:
    """``ok``, ``dropped`` (every reason), ``write_error`` and ``anomalies`` from ``/metrics``."""
    out = {"ok": 0.0, "dropped": 0.0, "write_error": 0.0, "anomalies": 0.0}
    for fam in text_string_to_metric_families(proc.metrics_text(port)):
        for s in fam.samples:
            if s.name == "tapio_anomalies_total":
                out["anomalies"] += s.value
            elif s.labels.get("sink") != "file":
                continue
            elif s.name == "tapio_sink_writes_total" and s.labels["result"] == "ok":
                out["ok"] += s.value
            elif s.name == "tapio_sink_drops_total":
                out["dropped"] += s.value
                if s.labels["reason"] == "write_error":
                    out["write_error"] += s.value
    return out


def settled(proc: AgentProcess, port: int, timeout: float = 30.0) -> dict[str, float]:
    """The counters once the sink has accounted for every occurrence emitted so far (the same
    balance on two reads in a row), or the last read after ``timeout``."""
    last: dict[str, float] = {}

    def balanced() -> bool:
        nonlocal last
        before = last
        last = file_sink_counts(proc, port)
        return last == before and last["ok"] + last["dropped"] == last["anomalies"]

    wait_until(balanced, timeout, interval=0.3)
    return last


def complete_files(d: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` parsed; a partial file fails the test (the sink promises none)."""
    out = []
    for path in sorted(d.glob("*.json")):
        out.append(json.loads(path.read_text()))
    return out


def test_full_filesystem_counts_every_occurrence_and_recovers(tmp_path: Path) -> None:
    require_kernel(("network",))
    metrics_port = 0  # the metrics server binds a free port itself and logs it
    closed_port = held_closed_port()
    config = f"""
[metrics]
enabled = true
port = {metrics_port}
bind_address = "127.0.0.1"
"""
    with (
        tiny_tmpfs(tmp_path / "occurrences") as data_dir,
        agent(tmp_path, observers=("network",), sinks=("file",), config=config) as proc,
    ):
        refuse(closed_port, count=REFUSALS)
        full = settled(proc, metrics_port)
        assert full["anomalies"] >= REFUSALS * 0.9, (full, proc.stderr()[-3000:])
        assert full["ok"] + full["dropped"] == full["anomalies"], full
        assert full["write_error"] > 0 and full["ok"] > 0, full  # the disk did fill up
        files = complete_files(data_dir)
        assert len(files) == full["ok"], (len(files), full)
        assert list(data_dir.glob(".*.tmp")) == []
        assert proc.proc is not None and proc.proc.poll() is None  # still running

        # Space returns: the next refusals are written again. (Other processes on the host may
        # cause refusals too; they are counted like ours, so compare against a fresh baseline.)
        for path in data_dir.glob("*.json"):
            path.unlink()
        base = settled(proc, metrics_port)
        refuse(closed_port, count=20)
        after = settled(proc, metrics_port)
        assert after["ok"] + after["dropped"] == after["anomalies"], after
        assert after["anomalies"] - base["anomalies"] >= 20, (base, after)
        assert after["ok"] - base["ok"] == after["anomalies"] - base["anomalies"], (base, after)
        assert after["write_error"] == base["write_error"], (base, after)
        refused = [
            o
            for o in complete_files(data_dir)
            if o["type"] == "kernel.network.connection_refused"
            and isinstance(o.get("data"), dict)
            and o["data"].get("dst_port") == closed_port
        ]
        assert len(refused) >= 20
        assert list(data_dir.glob(".*.tmp")) == []
        assert proc.proc is not None and proc.proc.poll() is None
