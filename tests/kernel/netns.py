"""Private network namespaces joined by a veth pair, for tests that need a real link.

Addresses come from TEST-NET-1 (192.0.2.0/24, RFC 5737) and ULA fd00:7a9::/64 inside namespaces
the test creates; nothing is routed off this machine. Both namespaces (and with them the veth
pair, qdiscs and nftables rulesets) are deleted on exit, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


def sh(cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", cmd], check=check, timeout=timeout, text=True, capture_output=True
    )


@dataclass
class NsPair:
    a: str  # client namespace
    b: str  # server namespace
    veth_a: str
    veth_b: str
    ip_a: str = "192.0.2.1"
    ip_b: str = "192.0.2.2"
    ip6_a: str = "fd00:7a9::1"
    ip6_b: str = "fd00:7a9::2"

    def exec_a(self, cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.a, "bash", "-c", cmd]

    def exec_b(self, cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.b, "bash", "-c", cmd]

    def in_a(self, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(f"ip netns exec {self.a} {cmd}", check=check)

    def in_b(self, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(f"ip netns exec {self.b} {cmd}", check=check)


@contextlib.contextmanager
def ns_pair() -> Iterator[NsPair]:
    tag = secrets.token_hex(3)
    pair = NsPair(f"tapio-a-{tag}", f"tapio-b-{tag}", f"tva{tag}", f"tvb{tag}")
    try:
        sh(f"ip netns add {pair.a} && ip netns add {pair.b}")
        sh(
            f"ip link add {pair.veth_a} netns {pair.a} type veth peer name {pair.veth_b} netns {pair.b}"
        )
        for ns, dev, ip, ip6 in (
            (pair.a, pair.veth_a, pair.ip_a, pair.ip6_a),
            (pair.b, pair.veth_b, pair.ip_b, pair.ip6_b),
        ):
            sh(
                f"ip -n {ns} link set lo up && ip -n {ns} addr add {ip}/24 dev {dev} && "
                f"ip -n {ns} addr add {ip6}/64 dev {dev} nodad && ip -n {ns} link set {dev} up"
            )
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            sh(f"ip netns del {ns}", check=False)


def netns_snmp(ns: str, proto: str, field: str) -> int:
    """A counter from /proc/net/snmp as seen inside ``ns`` (e.g. Tcp RetransSegs)."""
    out = sh(f"ip netns exec {ns} cat /proc/net/snmp").stdout.splitlines()
    for i in range(0, len(out) - 1, 2):
        head, vals = out[i].split(), out[i + 1].split()
        if head[0] == f"{proto}:":
            return int(vals[head.index(field)])
    raise KeyError(f"{proto}:{field}")


def have_tool(name: str) -> bool:
    return any(
        os.access(os.path.join(d, name), os.X_OK)
        for d in [
            *os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"),
            "/usr/sbin",
            "/sbin",
        ]
    )


def add_loss(pair: NsPair, dport: int, percent: int) -> str:
    """Drop ``percent`` % of the client's packets to ``dport``; returns the method used.

    netem replaces the root qdisc of the client's veth (it then drops from everything the client
    sends, so use it while only that transfer runs): one small module, installed in milliseconds
    even on an emulated CPU, where nftables' rule install can take longer than a command may.
    Kernels built without netem (the 6.18 kernel of the project's own machines) get an nftables
    rule at the server's input instead, there built in. Either way real segments are lost on the
    link and TCP really retransmits them.

    The nftables rule drops every n-th packet (n = 100 / percent) rather than a random draw: a
    veth hands the receiver whole GSO packets, so a 16 MiB transfer is only a few hundred of
    them, and a 3 % draw over so few sometimes drops just one (a CI run saw 46 retransmitted
    segments where ~300 are expected). Counting makes the loss the same in every run.
    """
    netem = pair.in_a(f"tc qdisc replace dev {pair.veth_a} root netem loss {percent}%", check=False)
    if netem.returncode == 0:
        return "netem"
    pair.in_b(
        "nft -f - <<'EOF'\n"
        "table inet tapio_loss { chain input { type filter hook input priority 0; "
        f"tcp dport {dport} numgen inc mod {max(1, 100 // percent)} == 0 drop; }}; }}\nEOF"
    )
    return "nftables"
