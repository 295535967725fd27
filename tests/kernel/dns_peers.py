"""A DNS server and a plain stub resolver of the DNS kernel tests, run as separate processes.

``python dns_peers.py serve <port-file>`` answers on UDP and TCP port 53 (all addresses of its
namespace): ``ok.test`` normally, ``fail.test`` SERVFAIL, ``refused.test`` REFUSED, ``nx.test``
NXDOMAIN, ``slow.test`` after 300 ms, and never ``drop.test``. It writes "ready" to the file
once both sockets listen.

``python dns_peers.py query <comm> <server> <name> <udp|tcp> [count] [wait_s]`` sets its comm,
sends ``count`` queries for ``name`` (a new socket and id each) and prints its pid, then one
RCODE (or ``timeout``) per query.
"""

from __future__ import annotations

import ctypes
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time
from pathlib import Path

RCODES = {"ok.test": 0, "fail.test": 2, "refused.test": 5, "nx.test": 3, "slow.test": 0}
SLOW_S = 0.3


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def query_packet(qid: int, name: str, qtype: int = 1) -> bytes:
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + encode_name(name)
        + struct.pack("!HH", qtype, 1)
    )


def answer(msg: bytes) -> bytes | None:
    """The answer to one query message, or None (drop.test, unparsable)."""
    if len(msg) < 12:
        return None
    qid, _flags = struct.unpack("!HH", msg[:4])
    labels, pos = [], 12
    while pos < len(msg) and msg[pos]:
        n = msg[pos]
        labels.append(msg[pos + 1 : pos + 1 + n].decode(errors="replace").lower())
        pos += 1 + n
    question = msg[12 : pos + 5]
    name = ".".join(labels)
    if name not in RCODES:
        return None
    rcode = RCODES[name]
    an = 1 if rcode == 0 else 0
    out = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, an, 0, 0) + question
    if an:
        out += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("192.0.2.99")
    return out


def serve(ready: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind(("0.0.0.0", 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 53))
    tcp.listen(64)
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    udp6.bind(("::", 53))
    sel = selectors.DefaultSelector()
    for s in (udp, udp6, tcp):
        sel.register(s, selectors.EVENT_READ)
    ready.write_text("ready")
    while True:
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is not tcp:
                msg, peer = sock.recvfrom(4096)
                out = answer(msg)
                if out is None:
                    continue
                if b"\x04slow\x04test\x00" in msg.lower():
                    threading.Timer(SLOW_S, sock.sendto, (out, peer)).start()
                else:
                    sock.sendto(out, peer)
            else:
                conn, _ = tcp.accept()
                threading.Thread(target=_tcp_conn, args=(conn,), daemon=True).start()


def _tcp_conn(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(5)
        try:
            head = conn.recv(2, socket.MSG_WAITALL)
            (n,) = struct.unpack("!H", head)
            msg = conn.recv(n, socket.MSG_WAITALL)
        except (OSError, struct.error):
            return
        out = answer(msg)
        if out is not None:
            if b"\x04slow\x04test\x00" in msg.lower():
                time.sleep(SLOW_S)
            conn.sendall(struct.pack("!H", len(out)) + out)
            time.sleep(0.2)


def one_query(server: str, name: str, transport: str, wait: float) -> str:
    qid = random.randrange(1, 0xFFFF)
    pkt = query_packet(qid, name)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    if transport == "udp":
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(wait)
            s.sendto(pkt, (server, 53))
            try:
                data = s.recv(4096)
            except TimeoutError:
                return "timeout"
    else:
        with socket.create_connection((server, 53), timeout=wait) as s:
            s.sendall(struct.pack("!H", len(pkt)) + pkt)
            try:
                head = s.recv(2, socket.MSG_WAITALL)
                data = s.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
            except (TimeoutError, struct.error):
                return "timeout"
    return str(struct.unpack("!HH", data[:4])[1] & 0xF)


def main() -> None:
    if sys.argv[1] == "serve":
        serve(Path(sys.argv[2]))
        return
    comm, server, name, transport = sys.argv[2:6]
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    wait = float(sys.argv[7]) if len(sys.argv) > 7 else 2.0
    set_comm(comm)
    print(os.getpid(), flush=True)
    for _ in range(count):
        print(one_query(server, name, transport, wait), flush=True)


if __name__ == "__main__":
    main()
