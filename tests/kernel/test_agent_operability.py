"""Start-up behaviour a platform engineer relies on: clear refusals and self-mounted tracefs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import require_kernel, wait_until

pytestmark = pytest.mark.kernel


def test_refuses_without_capabilities_with_one_line(tmp_path: Path) -> None:
    require_kernel()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            sys.executable,
            "-m",
            "tapio",
            "agent",
            "--config",
            "/nonexistent/tapio.toml",
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tapio agent:")]
    assert len(lines) == 1 and "CAP_BPF" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_flags_and_config_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[thresholds\n")
    for args in (
        ["--sink", "carrier-pigeon"],
        ["--heartbeat-interval", "4"],
        ["--config", str(bad)],
        ["--sink", "controller"],
        ["--observer", "nope"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "tapio", "agent", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.strip(), args


def test_mounts_tracefs_itself_when_missing(tmp_path: Path) -> None:
    """In a private mount namespace without tracefs, the agent mounts it and attaches."""
    require_kernel()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    data = tmp_path / "occ"
    script = (
        "umount -l /sys/kernel/tracing 2>/dev/null; "
        "test ! -d /sys/kernel/tracing/events || exit 99; "
        f"exec {sys.executable} -m tapio agent --observer network --sink file "
        f"--data-dir {data} --config {tmp_path / 'none.toml'} --log-format json"
    )
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        time.sleep(1)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""

        def refused() -> bool:
            c = socket.socket()
            try:
                c.connect(("127.0.0.1", port))
            except OSError:
                pass
            finally:
                c.close()
            return any(data.glob("*.json"))

        ok = wait_until(refused, 20, interval=0.2)
        assert ok, "no occurrence: the agent did not get tracefs"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0


def test_health_shows_what_this_node_cannot_observe(tmp_path: Path) -> None:
    """No hardware PMU here: `tapio health` says ipc_degradation is unsupported (from the
    agent's status file), while the occurrence table stays the reference's."""
    require_kernel(("node",))
    from .harness import agent

    with agent(tmp_path, observers=("node", "network")) as a:
        status = a.data_dir / ".tapio-agent-status"
        assert wait_until(status.exists, 15), a.stderr()[-2000:]
        proc = subprocess.run(
            [sys.executable, "-m", "tapio", "health", "--data-dir", str(a.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    # health is a check: 0 healthy, 1 anomalies in the last hour (this host may have some)
    out = proc.stdout
    assert proc.returncode == (0 if "overall: healthy" in out else 1), (proc.returncode, out)
    assert out.startswith("Observer     Anomalies")
    pmu = Path("/sys/bus/event_source/devices/cpu").exists()
    if pmu:
        assert "ipc_degradation unsupported" not in out
    else:
        assert "node: kernel.node.ipc_degradation unsupported:" in out, out
        assert "node: degraded: no_pmu" in out
