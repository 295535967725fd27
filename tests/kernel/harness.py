"""Shared kernel-test harness: start the real agent as a user would and read what it emits.

Kernel tests need root and a BPF-capable kernel. Outside CI they skip with a reason; with
``CI=true`` a test that would skip fails instead, so a green CI run always exercised the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
OBJECTS = REPO / "src" / "tapio" / "bpf" / "objects"
# Waits are stretched by this factor where the CPU is emulated (the kernel matrix boots kernels
# under QEMU/TCG, 10-30x slower than a real CPU); never shortened.
TIME_SCALE = max(1.0, float(os.environ.get("TAPIO_TEST_TIME_SCALE", "1")))


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"kernel test cannot run in CI: {reason}")
    pytest.skip(reason)


def require_kernel(objects: Sequence[str] = ("network",)) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        skip_or_fail("kernel has no BTF")
    for name in objects:
        if not (OBJECTS / f"{name}.bpf.o").exists():
            skip_or_fail(f"{name}.bpf.o not built (run python build_bpf.py)")


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout * TIME_SCALE
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class AgentProcess:
    """``python -m tapio agent`` in a subprocess with the file sink (and optionally stdout)."""

    def __init__(
        self,
        tmp: Path,
        *,
        observers: Sequence[str] = ("network",),
        config: str | None = None,
        sinks: Sequence[str] = ("file",),
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "occurrences"
        self.config_path = tmp / "tapio.toml"
        self.config_path.write_text(config or "")
        self.stderr_path = tmp / "agent.stderr"
        self.stdout_path = tmp / "agent.stdout"
        cmd = [sys.executable, "-m", "tapio", "agent", "--config", str(self.config_path)]
        for s in sinks:
            cmd += ["--sink", s]
        cmd += ["--data-dir", str(self.data_dir), "--log-format", "json"]
        for o in observers:
            cmd += ["--observer", o]
        cmd += list(extra_args)
        self.cmd = cmd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> AgentProcess:
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            self.cmd, stdout=self._stdout, stderr=self._stderr, env=self.env, cwd=self.tmp
        )
        self.proc = proc
        ok = wait_until(
            lambda: "agent started" in self.stderr() or proc.poll() is not None, timeout
        )  # (stretched by TIME_SCALE like every wait)
        if not ok or proc.poll() is not None:
            self.stop()
            raise AssertionError(f"agent did not start:\n{self.stderr()}")
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def occurrences(self, type_prefix: str = "") -> list[dict[str, Any]]:
        """Every occurrence the file sink wrote so far (type filtered by prefix)."""
        out: list[dict[str, Any]] = []
        if not self.data_dir.exists():
            return out
        for path in sorted(self.data_dir.glob("*.json")):
            try:
                occ = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if occ.get("type", "").startswith(type_prefix):
                out.append(occ)
        return out

    def stdout_occurrences(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout_path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def metrics_text(self, port: int, wait: float = 10.0) -> str:
        """``/metrics`` of the agent; the server binds concurrently with "agent started", so a
        refused connection is retried for ``wait`` seconds (as long as the agent is alive)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + wait
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return str(r.read().decode())
            except urllib.error.URLError as exc:
                refused = isinstance(exc.reason, ConnectionRefusedError)
                alive = self.proc is not None and self.proc.poll() is None
                if not (refused and alive) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout * TIME_SCALE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()
        self._stdout.close()
        return int(self.proc.returncode)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def agent(tmp: Path, **kwargs: Any) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp, **kwargs)
    proc.start()
    try:
        yield proc
    finally:
        rc = proc.stop()
        assert rc == 0, f"agent exited {rc}:\n{proc.stderr()[-4000:]}"


def run(
    cmd: Sequence[str] | str, check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[str]:
    if isinstance(cmd, str):
        cmd = ["bash", "-c", cmd]
    return subprocess.run(
        list(cmd), check=check, timeout=timeout, text=True, capture_output=True, **kw
    )
