"""A real nats-server (Debian package ``nats-server``) with JetStream, for forwarding tests.

Bound to 127.0.0.1: the first ``start()`` lets the server pick a free port (``-p -1``) and reads
the one it reports in its log; ``stop()`` and ``start()`` again keep that port and the store (in
the test's tmp dir), as a restarted server would. Always stopped at
the end, even on failure (context manager).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
from nats.js.api import RawStreamMsg

_LISTENING = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")


class NatsServer:
    def __init__(self, store: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():  # a missing dependency fails (CI), it never skips
            raise AssertionError("nats-server not installed (scripts/setup.sh --test)")
        self.binary = binary
        self.store = store
        self.port = 0  # known once started
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store / "nats-server.log"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None
        self.store.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1"]
        cmd += ["-p", str(self.port or -1), "-l", str(self.log)]
        seen = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            if not self.port:
                text = self.log.read_text()[seen:] if self.log.exists() else ""
                found = _LISTENING.search(text)
                if found is None:
                    time.sleep(0.05)
                    continue
                self.port = int(found.group(1))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nats-server did not start listening")

    @property
    def url(self) -> str:
        assert self.port, "the port is known once the server has started"
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def stream_messages(url: str, stream: str = "TAPIO_EVIDENCE") -> list[RawStreamMsg]:
    """Every message stored in ``stream``, in order (read by sequence, no consumer created)."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        first, last = info.state.first_seq, info.state.last_seq
        out = []
        for seq in range(first, last + 1) if info.state.messages else ():
            out.append(await js.get_msg(stream, seq))
        return out
    finally:
        await nc.close()


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
