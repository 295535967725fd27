"""Network observer: parse ``struct network_event`` (bpf/network.h) and classify it.

The kernel side already decided which fact happened (refused, timed out, retransmit spike, RTT
spike) and filtered everything else, so classification here is formatting: addresses, names,
the occurrence's severity/outcome/code/message and its ``data`` facts.
"""

from __future__ import annotations

import socket
from typing import Any, ClassVar

from tapio.bpf.abi import METRIC_OBSERVER_BASE, CStruct
from tapio.bpf.features import ProgramSpec
from tapio.observers.base import Observer
from tapio.occurrence import (
    NETWORK_CONNECTION_REFUSED,
    NETWORK_CONNECTION_TIMEOUT,
    NETWORK_RETRANSMIT_SPIKE,
    NETWORK_RTT_DEGRADATION,
    Occurrence,
    new_occurrence,
)

NETWORK_EVENT = CStruct(
    "network_event",
    """
    timestamp_ns      Q
    config_generation I
    pid               I
    tid               I
    event_type        B
    family            B
    pid_source        B
    old_state         B
    new_state         B
    flags             B
    sport             H
    dport             H
    _pad1             2x
    saddr             16s
    daddr             16s
    sk_err            I
    retrans_count     I
    total_retrans     I
    snd_cwnd          I
    rtt_baseline_us   I
    rtt_current_us    I
    rtt_samples       I
    _pad2             4x
    duration_ns       Q
    comm              16s
    """,
    120,
)

EV_CONN_REFUSED = 1
EV_CONN_TIMEOUT = 2
EV_RETRANS_SPIKE = 3
EV_RTT_SPIKE = 4

FLAG_RST = 1

PID_SOURCES = {0: "none", 1: "connect"}

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}

ERRNO_NAMES = {
    110: "ETIMEDOUT",
    111: "ECONNREFUSED",
    113: "EHOSTUNREACH",
    101: "ENETUNREACH",
    104: "ECONNRESET",
    71: "EPROTO",
}

AF_INET = 2
AF_INET6 = 10
_CACHE_MAX = 4096


def state_name(state: int) -> str:
    return TCP_STATES.get(state, "UNKNOWN")


def _fmt_ms(us: int) -> str:
    return f"{us / 1000:g}"


class NetworkObserver(Observer):
    name = "network"
    object_name = "network"
    record = NETWORK_EVENT
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {
        METRIC_OBSERVER_BASE + 0: ("kernel_drop", "connect_aborted_by_application"),
        METRIC_OBSERVER_BASE + 1: ("kernel_drop", "untracked_close"),
    }
    programs: ClassVar[tuple[ProgramSpec, ...]] = (
        ProgramSpec(
            "handle_set_state",
            "connect_state",
            (NETWORK_CONNECTION_REFUSED, NETWORK_CONNECTION_TIMEOUT),
        ),
        # Marks the RST on a connecting socket; refusals are still told by sk_err without it.
        ProgramSpec("handle_receive_reset", "receive_reset"),
        ProgramSpec("handle_retransmit", "retransmit", (NETWORK_RETRANSMIT_SPIKE,)),
        ProgramSpec("handle_tcp_probe", "tcp_probe", (NETWORK_RTT_DEGRADATION,)),
    )

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._addr_cache: dict[tuple[int, bytes], str] = {}

    def _addr(self, family: int, raw: bytes) -> str:
        key = (family, raw)
        text = self._addr_cache.get(key)
        if text is None:
            if len(self._addr_cache) >= _CACHE_MAX:
                self._addr_cache.clear()
            if family == AF_INET6:
                text = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                text = socket.inet_ntop(socket.AF_INET, raw[:4])
            self._addr_cache[key] = text
        return text

    def classify_one(self, frame: tuple[Any, ...], boot_offset_ns: int) -> Occurrence | None:
        """One ring frame: (header_len, *network_event fields) → occurrence or None.

        ``data`` dicts are written in sorted key order (the contract's key order) so no sort
        is needed on this hot path; tests assert the order.
        """
        (
            _hdr,
            ts,
            generation,
            pid,
            tid,
            ev_type,
            family,
            pid_source,
            old_state,
            new_state,
            flags,
            sport,
            dport,
            saddr,
            daddr,
            sk_err,
            retrans_count,
            total_retrans,
            snd_cwnd,
            rtt_base,
            rtt_cur,
            rtt_samples,
            duration_ns,
            comm_raw,
        ) = frame
        cache = self._addr_cache
        src = cache.get((family, saddr)) or self._addr(family, saddr)
        dst = cache.get((family, daddr)) or self._addr(family, daddr)
        comm = self.strings.cache.get(comm_raw) or self.strings.decode(comm_raw)
        fam = "ipv6" if family == AF_INET6 else "ipv4"
        psrc = PID_SOURCES.get(pid_source, "none")
        when = boot_offset_ns + ts
        if ev_type == EV_CONN_REFUSED:
            return new_occurrence(
                NETWORK_CONNECTION_REFUSED,
                "warning",
                "failure",
                when,
                "RST_RECEIVED",
                f"TCP RST {src}:{sport} → {dst}:{dport}",
                {
                    "comm": comm,
                    "config_generation": generation,
                    "connect_duration_ms": duration_ns // 1000 / 1000,
                    "dst_ip": dst,
                    "dst_port": dport,
                    "family": fam,
                    "pid": pid,
                    "pid_source": psrc,
                    "protocol": "tcp",
                    "reason": "rst" if flags & FLAG_RST else "icmp",
                    "src_ip": src,
                    "src_port": sport,
                    "tid": tid,
                    "timestamp_ns": ts,
                },
                data_sorted=True,
            )
        if ev_type == EV_CONN_TIMEOUT:
            return new_occurrence(
                NETWORK_CONNECTION_TIMEOUT,
                "error",
                "failure",
                when,
                "SYN_TIMEOUT",
                f"Connection timeout to {dst}:{dport} (SYN_SENT→CLOSE)",
                {
                    "comm": comm,
                    "config_generation": generation,
                    "connect_duration_ms": duration_ns // 1000 / 1000,
                    "dst_ip": dst,
                    "dst_port": dport,
                    "error": ERRNO_NAMES.get(sk_err, f"errno {sk_err}"),
                    "family": fam,
                    "new_state": state_name(new_state),
                    "old_state": state_name(old_state),
                    "pid": pid,
                    "pid_source": psrc,
                    "protocol": "tcp",
                    "src_ip": src,
                    "src_port": sport,
                    "tid": tid,
                    "timestamp_ns": ts,
                },
                data_sorted=True,
            )
        if ev_type == EV_RETRANS_SPIKE:
            return new_occurrence(
                NETWORK_RETRANSMIT_SPIKE,
                "warning",
                "failure",
                when,
                "RETRANSMIT",
                (
                    f"TCP retransmit {src}:{sport} → {dst}:{dport} "
                    f"(total={total_retrans}, cwnd={snd_cwnd})"
                ),
                {
                    "comm": comm,
                    "config_generation": generation,
                    "dst_ip": dst,
                    "dst_port": dport,
                    "family": fam,
                    "pid": pid,
                    "pid_source": psrc,
                    "protocol": "tcp",
                    "retransmits_in_window": retrans_count,
                    "snd_cwnd": snd_cwnd,
                    "src_ip": src,
                    "src_port": sport,
                    "tcp_state": state_name(old_state),
                    "tid": tid,
                    "timestamp_ns": ts,
                    "total_retrans": total_retrans,
                    "window_ms": duration_ns // 1000 / 1000,
                },
                data_sorted=True,
            )
        if ev_type == EV_RTT_SPIKE:
            return new_occurrence(
                NETWORK_RTT_DEGRADATION,
                "warning",
                "in_progress",
                when,
                "RTT_SPIKE",
                (
                    f"RTT spike {src}:{sport} → {dst}:{dport} "
                    f"(baseline={_fmt_ms(rtt_base)}ms, current={_fmt_ms(rtt_cur)}ms)"
                ),
                {
                    "baseline_ms": rtt_base // 1000,
                    "baseline_samples": rtt_samples,
                    "baseline_us": rtt_base,
                    "comm": comm,
                    "config_generation": generation,
                    "current_ms": rtt_cur // 1000,
                    "current_us": rtt_cur,
                    "dst_ip": dst,
                    "dst_port": dport,
                    "family": fam,
                    "pid": pid,
                    "pid_source": psrc,
                    "protocol": "tcp",
                    "snd_cwnd": snd_cwnd,
                    "src_ip": src,
                    "src_port": sport,
                    "tid": tid,
                    "timestamp_ns": ts,
                },
                data_sorted=True,
            )
        self.drop("unknown_record_type")  # a newer BPF object than this agent knows
        return None
