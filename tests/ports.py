"""Loopback ports for tests: one free (hence closed) port, and refused connections to it."""

from __future__ import annotations

import socket


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bound, read, released)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def refuse(port: int, count: int = 1, host: str = "127.0.0.1") -> None:
    """``count`` connects to a closed port, each refused; an accepted one fails the test."""
    for _ in range(count):
        try:
            socket.create_connection((host, port), timeout=2).close()
        except ConnectionRefusedError:
            continue
        raise AssertionError(f"{host}:{port} unexpectedly accepted a connection")
