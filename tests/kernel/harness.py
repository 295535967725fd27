"""Shared kernel-test harness: start the real agent as a user would and read what it emits.

Kernel tests need root and a BPF-capable kernel. Outside CI they skip with a reason; with
``CI=true`` the suite-wide skip policy (tests/conftest.py) turns such a skip into a failure, so
a green CI run always exercised the kernel.
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


def require_kernel(objects: Sequence[str] = ("network",)) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        pytest.skip("kernel has no BTF")
    for name in objects:
        if not (OBJECTS / f"{name}.bpf.o").exists():
            pytest.skip(f"{name}.bpf.o not built (run python build_bpf.py)")


def kernel_release() -> tuple[int, ...]:
    """The running kernel's (major, minor), for tests whose expected build depends on it."""
    return tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])


def net_client(mode: str, comm: str, *args: object, ns: str | None = None) -> list[str]:
    """argv of one of the network tests' client processes (``net_clients.py``), which sets its
    own comm; in network namespace ``ns`` when given."""
    cmd = [sys.executable, str(Path(__file__).with_name("net_clients.py")), mode, comm]
    cmd += map(str, args)
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


def set_state_program(program_ids: dict[str, int]) -> int:
    """The id of the network object's connect program, whichever build of it is loaded (the
    slot table's on 5.12+, the LRU hash's before): a handle on the object's maps."""
    return program_ids.get("handle_set_state_slot") or program_ids["handle_set_state"]


def network_map_id(logs: list[dict[str, object]], map_name: str) -> int:
    """The kernel id of map ``map_name`` of a running agent's network object (by bpftool, from
    the program ids the agent logged at start)."""
    for entry in logs:
        if entry.get("event") == "network observer running":
            ids: dict[str, int] = entry["program_ids"]  # type: ignore[assignment]
            prog = set_state_program(ids)
            info = json.loads(_bpftool(f"prog show id {prog} -j"))
            for map_id in info["map_ids"]:
                if json.loads(_bpftool(f"map show id {map_id} -j"))["name"] == map_name:
                    return int(map_id)
            raise AssertionError(f"the network object has no map {map_name}")
    raise AssertionError("network observer start log not found")


def _bpftool(args: str) -> str:
    return subprocess.run(
        ["bpftool", *args.split()], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def stop_process(
    proc: subprocess.Popen[Any], timeout: float, sig: int = signal.SIGTERM
) -> int | None:
    """Signal ``proc`` (if it still runs), wait ``timeout`` seconds, then kill it; the exit
    code (a killed process's is negative)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


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
        """Every occurrence the file sink wrote so far (type filtered by prefix).

        The file sink writes a temporary name and renames it into place, so a ``*.json`` file
        is complete or absent; one that does not parse fails the test rather than being
        passed over. A file removed between listing and reading (retention) is not an error.
        """
        out: list[dict[str, Any]] = []
        if not self.data_dir.exists():
            return out
        for path in sorted(self.data_dir.glob("*.json")):
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                occ = json.loads(text)
            except ValueError as exc:
                raise AssertionError(f"{path} is not one complete JSON document: {exc}") from exc
            if occ.get("type", "").startswith(type_prefix):
                out.append(occ)
        return out

    def stdout_occurrences(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout_path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def metrics_url(self, wait: float = 10.0) -> str:
        """Base URL of the agent's metrics server, from its "metrics server listening" log line
        (configure ``port = 0``: the server binds a free port itself and reports it)."""

        def listening() -> str:
            for entry in self.logs():
                if entry.get("event") == "metrics server listening":
                    return str(entry["url"])
            return ""

        url = wait_until(listening, wait)
        assert url, f"the metrics server never reported its address:\n{self.stderr()[-3000:]}"
        return str(url)

    def http_get(self, path: str, wait: float = 10.0) -> tuple[int, str]:
        """GET ``path`` on the agent's metrics server: (status, body), error statuses included."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.metrics_url(wait) + path, timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def metrics_text(self, port: int | None = None, wait: float = 10.0) -> str:
        """``/metrics`` of the agent (at the address it reported when ``port`` is None or 0,
        i.e. configured as ``port = 0``); the
        server binds concurrently with "agent started", so a refused connection is retried for
        ``wait`` seconds (as long as the agent is alive)."""
        import urllib.error
        import urllib.request

        base = f"http://127.0.0.1:{port}" if port else self.metrics_url(wait)
        deadline = time.monotonic() + wait
        while True:
            try:
                with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
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
        stop_process(self.proc, timeout * TIME_SCALE, sig)
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
