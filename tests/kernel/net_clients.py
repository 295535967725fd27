"""Small client/server programs the network kernel tests run as separate processes.

Run as ``python net_clients.py <mode> ...``; each sets its own comm (``prctl(PR_SET_NAME)``) so
the test can assert the agent attributed the fact to the right process.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import threading
import time


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def refuse(host: str, port: int, count: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    done = 0
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            done += 1
        finally:
            s.close()
    print(done, flush=True)


def timeout(host: str, port: int) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    t0 = time.monotonic()
    try:
        s.connect((host, port))
    except (TimeoutError, OSError) as exc:
        print(f"{type(exc).__name__} {exc.errno} {time.monotonic() - t0:.1f}", flush=True)
    finally:
        s.close()


def sink_server(host: str, port: int, echo: bool) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(8)
    print("listening", flush=True)
    srv.settimeout(60)
    while True:
        conn, _ = srv.accept()
        conn.settimeout(60)

        def serve(c: socket.socket = conn) -> None:
            try:
                while True:
                    data = c.recv(65536)
                    if not data:
                        break
                    if echo:
                        c.sendall(data)
            except OSError:
                pass
            finally:
                c.close()

        threading.Thread(target=serve, daemon=True).start()


def bulk(host: str, port: int, nbytes: int) -> None:
    s = socket.create_connection((host, port), timeout=60)
    chunk = b"x" * 65536
    sent = 0
    while sent < nbytes:
        s.sendall(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    print(sent, flush=True)


def pingpong(host: str, port: int, steady_secs: float, bulk_secs: float) -> None:
    """Phase 1: one byte every 20 ms (echoed). Phase 2 (after 'GO' on stdin): 8 KiB every
    5 ms while a reader thread drains the echo, so the sender's queue builds behind tbf."""
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                if not s.recv(65536):
                    return
            except OSError:
                return

    threading.Thread(target=reader, daemon=True).start()
    end = time.monotonic() + steady_secs
    while time.monotonic() < end:
        s.send(b"p")
        time.sleep(0.02)
    print("steady-done", flush=True)
    sys.stdin.readline()
    end = time.monotonic() + bulk_secs
    chunk = b"y" * 8192
    while time.monotonic() < end:
        s.send(chunk)
        time.sleep(0.005)
    stop.set()
    print("bulk-done", flush=True)
    s.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    set_comm(sys.argv[2])
    args = sys.argv[3:]
    if mode == "refuse":
        refuse(args[0], int(args[1]), int(args[2]))
    elif mode == "timeout":
        timeout(args[0], int(args[1]))
    elif mode == "server":
        sink_server(args[0], int(args[1]), args[2] == "echo")
    elif mode == "bulk":
        bulk(args[0], int(args[1]), int(args[2]))
    elif mode == "pingpong":
        pingpong(args[0], int(args[1]), float(args[2]), float(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
