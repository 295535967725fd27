"""Loopback ports for tests: closed ports that stay closed, and refused connections to them.

A port that is bound, read and released can be taken by anyone before the test uses it. A
closed port here stays *bound* (never listening) for the rest of the test process instead:
the kernel answers every connect to it with a RST, exactly like a port nobody uses, and no
other socket can bind it in the meantime. Servers never take a port from here: they bind
port 0 and report the port they got (the agent's and the controller's start-up logs say it).
"""

from __future__ import annotations

import socket

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


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A port nothing is bound to right now (bound, read, released), for the one case port 0
    cannot serve: a server that must come back on the *same* port after a restart. Anything
    else binds port 0 (servers) or uses :func:`closed_port` (refusals)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
