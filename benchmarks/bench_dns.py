#!/usr/bin/env python3
"""DNS programs' overhead: a UDP query loop and a bulk TCP transfer, with and without them.

The network object's cgroup_skb programs (attached at the cgroup v2 root, as the agent does)
see every packet of the node. Two workloads, both in private network namespaces so port 53 and
the link are the benchmark's own, both driven by a small C program (compiled here with gcc, so
Python does not dilute the ratio):

  * UDP query loop: one client sends a DNS query to a local server (the same C program) and
    waits for its answer, N times; reported as ns per query (target <= 1.10x). Every query
    and answer is parsed, tracked and matched by the programs;
  * bulk TCP: one connection sends 1 GiB across a veth between two namespaces; reported as
    Gbit/s (target: throughput ratio >= 1/1.05). Every segment passes both programs (and is
    dismissed at the port check).

Needs root. Alternates bare/attached runs and reports medians and the baselines of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tapio.bpf.abi import DNS_ENABLED, FLAG_NETWORK, TapioConfig
from tapio.bpf.loader import BpfObject, objects_dir
from tapio.observers.cgroups.roots import discover_roots
from tapio.observers.network import DNS_EGRESS, DNS_INGRESS, NetworkObserver

PEER_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    const char *mode = argv[1];
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &a.sin_addr);
    if (!strcmp(mode, "dns-serve")) {           /* answer every query NOERROR, no records */
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (bind(s, (void *)&a, sizeof(a))) { perror("bind"); return 1; }
        puts("ready"); fflush(stdout);
        unsigned char b[512]; struct sockaddr_in p; socklen_t pl;
        for (;;) {
            pl = sizeof(p);
            ssize_t n = recvfrom(s, b, sizeof(b), 0, (void *)&p, &pl);
            if (n < 12) continue;
            b[2] |= 0x80; b[3] = 0x80;
            sendto(s, b, n, 0, (void *)&p, pl);
        }
    }
    if (!strcmp(mode, "dns-query")) {           /* N queries, one at a time: ns per query */
        long n = atol(argv[4]);
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        connect(s, (void *)&a, sizeof(a));
        unsigned char q[] = {0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, 'b', 'e', 'n', 'c', 'h',
                             4, 't', 'e', 's', 't', 0, 0, 1, 0, 1};
        unsigned char r[512];
        double t0 = now();
        for (long i = 0; i < n; i++) {
            q[0] = i >> 8; q[1] = i;
            send(s, q, sizeof(q), 0);
            if (recv(s, r, sizeof(r), 0) < 12) { fprintf(stderr, "short answer\n"); return 1; }
        }
        printf("%.1f\n", (now() - t0) * 1e9 / n);
        return 0;
    }
    if (!strcmp(mode, "tcp-sink")) {            /* accept one connection, read to EOF */
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(l, (void *)&a, sizeof(a)) || listen(l, 1)) { perror("listen"); return 1; }
        puts("ready"); fflush(stdout);
        int c = accept(l, 0, 0);
        static char b[1 << 16];
        while (read(c, b, sizeof(b)) > 0) {}
        return 0;
    }
    if (!strcmp(mode, "tcp-send")) {            /* send N MiB: Gbit/s */
        long mib = atol(argv[4]);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
        static char b[1 << 20];
        double t0 = now();
        for (long i = 0; i < mib; i++) {
            size_t off = 0;
            while (off < sizeof(b)) {
                ssize_t w = write(s, b + off, sizeof(b) - off);
                if (w <= 0) { perror("write"); return 1; }
                off += w;
            }
        }
        shutdown(s, SHUT_WR);
        while (read(s, b, sizeof(b)) > 0) {}
        printf("%.3f\n", mib * 8.0 * 1048576 / (now() - t0) / 1e9);
        return 0;
    }
    return 2;
}
"""


def sh(cmd: str) -> None:
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth (192.0.2.1 / 192.0.2.2), deleted on exit."""
    tag = secrets.token_hex(3)
    a, b = f"tbench-a-{tag}", f"tbench-b-{tag}"
    try:
        sh(f"ip netns add {a} && ip netns add {b}")
        sh(f"ip link add va{tag} netns {a} type veth peer name vb{tag} netns {b}")
        for ns, dev, ip in ((a, f"va{tag}", "192.0.2.1"), (b, f"vb{tag}", "192.0.2.2")):
            sh(f"ip -n {ns} link set lo up && ip -n {ns} addr add {ip}/24 dev {dev}")
            sh(f"ip -n {ns} link set {dev} up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@contextlib.contextmanager
def server(cmd: list[str]) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)


def run(cmd: list[str]) -> float:
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


@contextlib.contextmanager
def dns_programs() -> Iterator[BpfObject]:
    """network.bpf.o with the agent's program specs; only the DNS programs attached."""
    root = discover_roots().unified
    if root is None:
        sys.exit("bench_dns: no cgroup v2 hierarchy mounted")
    obj = BpfObject(objects_dir() / "network.bpf.o", programs=NetworkObserver.programs)
    with obj:
        cfg = TapioConfig(
            generation=1,
            flags=FLAG_NETWORK,
            dns_flags=DNS_ENABLED,
            dns_ports=(53,),
            dns_slow_ns=100_000_000,
            dns_timeout_ns=5 * 10**9,
        )
        obj.map("tapio_config").update(bytes(4), cfg.pack())
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in (*DNS_EGRESS, DNS_INGRESS):
                if name in obj.programs:
                    obj.attach_cgroup(name, fd)
        finally:
            os.close(fd)
        if DNS_INGRESS not in obj.attached or not obj.attached & set(DNS_EGRESS):
            sys.exit(f"bench_dns: DNS programs not attached: {obj.skipped}")
        yield obj


def measure(rounds: int, bare_cmd: list[str]) -> tuple[float, float]:
    bare: list[float] = []
    attached: list[float] = []
    for _ in range(rounds):
        bare.append(run(bare_cmd))
        with dns_programs():
            attached.append(run(bare_cmd))
    return statistics.median(bare), statistics.median(attached)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=20000, help="DNS queries per run")
    ap.add_argument("--mib", type=int, default=1024, help="MiB per TCP transfer")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_dns: needs root")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("bench_dns: needs gcc")
    with tempfile.TemporaryDirectory() as tmp, namespaces() as (a, b):
        src, exe = Path(tmp) / "peer.c", Path(tmp) / "peer"
        src.write_text(PEER_C)
        subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
        p = str(exe)
        with server(in_ns(b, p, "dns-serve", "127.0.0.1", "53")):
            query = in_ns(b, p, "dns-query", "127.0.0.1", "53", str(args.n))
            run(query)  # warm up
            q_bare, q_att = measure(args.rounds, query)
        t_bare: list[float] = []
        t_att: list[float] = []
        send = in_ns(a, p, "tcp-send", "192.0.2.2", "5201", str(args.mib))
        for _ in range(args.rounds):
            for results, attach in ((t_bare, False), (t_att, True)):
                with contextlib.ExitStack() as stack:
                    if attach:
                        stack.enter_context(dns_programs())
                    stack.enter_context(server(in_ns(b, p, "tcp-sink", "0.0.0.0", "5201")))
                    time.sleep(0.05)
                    results.append(run(send))
        tb, ta = statistics.median(t_bare), statistics.median(t_att)
    print(f"{'workload':34} {'bare':>12} {'attached':>12} {'ratio':>7} {'target':>8}")
    print(
        f"{'UDP DNS query loop (ns/query)':34} {q_bare:12.0f} {q_att:12.0f} "
        f"{q_att / q_bare:7.3f} {'<= 1.10':>8}"
    )
    print(f"{'bulk TCP over veth (Gbit/s)':34} {tb:12.2f} {ta:12.2f} {tb / ta:7.3f} {'<= 1.05':>8}")
    print(
        f"(median of {args.rounds} alternating runs; {args.n} queries, {args.mib} MiB per run; "
        "TCP ratio is bare/attached throughput)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
