"""Small client/server programs the network kernel tests run as separate processes.

Run as ``python net_clients.py <mode> ...``; each sets its own comm (``prctl(PR_SET_NAME)``) so
the test can assert the agent attributed the fact to the right process.
"""

from __future__ import annotations

import ctypes
import socket
import struct
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


# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_rtt is the 16th u32. It has
# been at this offset since the structure was introduced, on every kernel the matrix runs.
_TCPI_RTT_OFFSET = 8 + 15 * 4
_TCP_INFO_LEN = 104


def tcp_srtt_us(s: socket.socket) -> int:
    """The kernel's smoothed RTT of ``s`` in microseconds: ``tcpi_rtt`` is ``srtt_us >> 3``, the
    very value the network observer's RTT hook reads from the socket."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return int(struct.unpack_from("=I", info, _TCPI_RTT_OFFSET)[0])


def pingpong(host: str, port: int, steady_secs: float, bulk_secs: float, samples: str) -> None:
    """Phase 1: one byte every 20 ms (echoed). Phase 2 (after 'GO' on stdin): 8 KiB every
    5 ms while a reader thread drains the echo, so the sender's queue builds behind tbf.

    A sampler thread reads the socket's own smoothed RTT (TCP_INFO) every 5 ms from connect until
    'STOP' on stdin, then writes ``<wall clock s> <phase> <srtt us>`` lines to ``samples``
    (phase: steady, idle until 'GO', load). One getsockopt per sample costs microseconds even
    on an emulated CPU, where spawning ``ss`` for each sample took longer than the whole
    degradation; the samples stay in memory until the end so sampling does no I/O while the
    flow is measured.
    """
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stop = threading.Event()
    phase = ["steady"]
    taken: list[tuple[float, str, int]] = []
    # Bounded: at most this many samples (10 minutes at 5 ms), whatever the test does.
    max_samples = 120_000

    def reader() -> None:
        while not stop.is_set():
            try:
                if not s.recv(65536):
                    return
            except OSError:
                return

    def sampler() -> None:
        while not stop.is_set() and len(taken) < max_samples:
            try:
                taken.append((time.time(), phase[0], tcp_srtt_us(s)))
            except OSError:
                return
            time.sleep(0.005)

    threading.Thread(target=reader, daemon=True).start()
    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    end = time.monotonic() + steady_secs
    while time.monotonic() < end:
        s.send(b"p")
        time.sleep(0.02)
    # Until 'GO' nothing is sent and srtt stands still: those samples are not the steady phase.
    phase[0] = "idle"
    print("steady-done", flush=True)
    sys.stdin.readline()
    phase[0] = "load"
    end = time.monotonic() + bulk_secs
    chunk = b"y" * 8192
    while time.monotonic() < end:
        s.send(chunk)
        time.sleep(0.005)
    print("bulk-done", flush=True)
    sys.stdin.readline()  # STOP (or end of input): the queue drains meanwhile, still sampled
    stop.set()
    sampling.join(5)
    with open(samples, "w", encoding="ascii") as f:
        f.writelines(f"{t:.6f} {ph} {us}\n" for t, ph, us in taken)
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
        pingpong(args[0], int(args[1]), float(args[2]), float(args[3]), args[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
