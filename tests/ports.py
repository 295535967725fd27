"""Loopback ports for tests: closed ports that stay closed, and refused connections to them.

A port that is bound, read and released can be taken by anyone before the test uses it. A
closed port here stays *bound* (never listening) for the rest of the test process instead:
the kernel answers every connect to it with a RST, exactly like a port nobody uses, and no
other socket can bind it in the meantime. Servers never take a port from here: they bind
port 0 and report the port they got (the agent's and the controller's start-up logs say it,
read by :func:`reported_port`); a server restarted "on the same port" binds the port its first
start reported.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

#: Held for the life of the test process; a few dozen sockets at most.
_HELD: list[socket.socket] = []


def closed_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that refuses every connection and that nothing else can bind."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
    except OSError:
        s.close()
        raise
    _HELD.append(s)
    return int(s.getsockname()[1])


def refuse(port: int, count: int = 1, host: str = "127.0.0.1") -> None:
    """``count`` connects to a closed port, each refused; an accepted one fails the test."""
    for _ in range(count):
        try:
            socket.create_connection((host, port), timeout=2).close()
        except ConnectionRefusedError:
            continue
        raise AssertionError(f"{host}:{port} unexpectedly accepted a connection")


def reported_port(
    read_log: Callable[[], str],
    alive: Callable[[], bool],
    event: str = "controller listening",
    timeout: float = 20.0,
) -> int:
    """The port a server bound (it was given port 0), from the JSON log line it writes once it
    listens: ``addresses`` (the controller) or ``url`` (the agent's metrics server).

    Waits up to ``timeout`` seconds; a server that exits first, or never says it, fails the
    test with its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = read_log()
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                if "addresses" in entry:
                    return int(entry["addresses"][0][1])
                return int(str(entry["url"]).rsplit(":", 1)[1].split("/", 1)[0])
        if not alive() or time.monotonic() >= deadline:
            raise AssertionError(f"no {event!r} line with the bound port:\n{text[-3000:]}")
        time.sleep(0.05)
