"""Network observer: parse ``struct network_event`` (bpf/network.h) and classify it.

The kernel side already decided which fact happened (refused, timed out, retransmit spike, RTT
spike) and filtered everything else, so classification here is formatting: addresses, names,
the occurrence's severity/outcome/code/message and its ``data`` facts.

Attribution: the kernel records who called ``connect()`` (pid, tid, comm and the task's cgroup2,
v1 memory and v1 cpu cgroup ids) at connect time, because refusals, timeouts, retransmits and
RTT samples are seen later in softirq or timer context. Those ids are facts (``cgroup2_id``,
``memory_cgroup_id``, ``cpu_cgroup_id``, with ``pid_source: "connect"``); the enrichment stage
(:class:`tapio.agent.pipeline.Enricher`) turns them into ``cgroup_path``, ``cgroup_id`` and the
container id, runtime and pod UID, exactly as for container and storage evidence. A socket whose
connect was not seen (accepted, or opened before the agent) has no owner: ``pid_source: "none"``
and zero ids, reported unknown (``cgroup_path: null``), never guessed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from tapio.bpf.abi import METRIC_OBSERVER_BASE, CStruct, TapioConfig
from tapio.bpf.features import ProgramSpec
from tapio.bpf.loader import BpfObject
from tapio.observers.base import Emit, Observer, UserThresholds
from tapio.observers.cgroups import ByCgroupId, Enrichment
from tapio.observers.cgroups.roots import discover_roots
from tapio.observers.dns.tracker import DnsTracker
from tapio.occurrence import (
    NETWORK_CONNECTION_REFUSED,
    NETWORK_CONNECTION_TIMEOUT,
    NETWORK_DNS_ERROR,
    NETWORK_DNS_SLOW,
    NETWORK_DNS_TIMEOUT,
    NETWORK_RETRANSMIT_SPIKE,
    NETWORK_RTT_DEGRADATION,
    Occurrence,
    Row,
    new_occurrence,
    occurrences,
)

if TYPE_CHECKING:
    from tapio.bpf.ringbuf import RingBuffer

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
    cgroup_id         Q
    memcg_id          Q
    cpu_cgroup_id     Q
    """,
    144,
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
# The connecting task's hierarchies, best first: cgroup2, then the v1 controllers a runtime
# places pods in on hybrid hosts.
_ORDER = ("unified", "cpu", "memory")
_BY_CONNECTOR = ByCgroupId(("unified", "memory", "cpu"), _ORDER)

log = structlog.get_logger("tapio.observers.network")

DNS_TYPES = (NETWORK_DNS_TIMEOUT, NETWORK_DNS_ERROR, NETWORK_DNS_SLOW)
_DNS_MAPS = ("dns_pending", "dns_events")
#: The DNS programs attach to the cgroup v2 root; egress has a variant without task helpers.
DNS_EGRESS = ("dns_egress", "dns_egress_anon")
DNS_INGRESS = "dns_ingress"


#: The programs that share the connect records, by the name of their LRU build.
_CONN_PROGRAMS = (
    "handle_set_state",
    "handle_receive_reset",
    "handle_retransmit",
    "handle_tcp_probe",
)


def _slot_and_lru(
    name: str, capability: str, anomalies: tuple[str, ...]
) -> tuple[ProgramSpec, ProgramSpec]:
    """The slot-table build of a connect-record program, then its LRU fallback (one group)."""
    partners = tuple(f"{n}_slot" for n in _CONN_PROGRAMS if n != name)
    return (
        ProgramSpec(
            f"{name}_slot",
            capability,
            anomalies,
            group=name,
            maps=("conn_slots",),
            needs=partners,
        ),
        ProgramSpec(name, capability, anomalies, group=name, maps=("conns",)),
    )


def _fmt_ms(us: int) -> str:
    return f"{us / 1000:g}"


class NetworkObserver(Observer):
    name = "network"
    object_name = "network"
    record = NETWORK_EVENT
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {
        METRIC_OBSERVER_BASE + 0: ("kernel_drop", "connect_aborted_by_application"),
        METRIC_OBSERVER_BASE + 1: ("kernel_drop", "untracked_close"),
        METRIC_OBSERVER_BASE + 10: ("correlation_drop", "dns_unmatched_answer"),
        METRIC_OBSERVER_BASE + 12: ("kernel_drop", "dns_not_a_query"),
    }
    # Each program that reads or writes the connect records has two builds, tried in order: the
    # slot table (BPF atomics: 5.12+), then the LRU hash (5.10, 5.11). The slot builds load
    # together or not at all, so one table never holds half a socket's story.
    programs: ClassVar[tuple[ProgramSpec, ...]] = (
        *_slot_and_lru(
            "handle_set_state",
            "connect_state",
            (NETWORK_CONNECTION_REFUSED, NETWORK_CONNECTION_TIMEOUT),
        ),
        # Marks the RST on a connecting socket; refusals are still told by sk_err without it.
        *_slot_and_lru("handle_receive_reset", "receive_reset", ()),
        *_slot_and_lru("handle_retransmit", "retransmit", (NETWORK_RETRANSMIT_SPIKE,)),
        *_slot_and_lru("handle_tcp_probe", "tcp_probe", (NETWORK_RTT_DEGRADATION,)),
        # DNS needs both directions: a query seen without its answer would read as a timeout.
        ProgramSpec("dns_egress", "dns_query", DNS_TYPES, group="dns_egress", maps=_DNS_MAPS),
        ProgramSpec("dns_egress_anon", "dns_query", DNS_TYPES, group="dns_egress", maps=_DNS_MAPS),
        ProgramSpec("dns_ingress", "dns_answer", DNS_TYPES, maps=_DNS_MAPS),
    )
    # TCP evidence: the connecting task's cgroups; DNS: the sending socket's cgroup2 id.
    enrichment: ClassVar[dict[str, Enrichment]] = {
        **{
            t: _BY_CONNECTOR
            for t in (
                NETWORK_CONNECTION_REFUSED,
                NETWORK_CONNECTION_TIMEOUT,
                NETWORK_RETRANSMIT_SPIKE,
                NETWORK_RTT_DEGRADATION,
            )
        },
        **{t: ByCgroupId(("unified",), ("unified",)) for t in DNS_TYPES},
    }

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Formatted addresses by raw bytes, one bounded memo per family (no key tuple per
        # lookup); anything that is not IPv6 is formatted as IPv4.
        self._v4: dict[bytes, str] = {}
        self._v6: dict[bytes, str] = {}
        self.dns = DnsTracker(self.ctx.boot_offset_ns, self._comm, self.drop)

    def _comm(self, raw: bytes) -> str:
        return self.strings.cache.get(raw) or self.strings.decode(raw)

    def attach(self, obj: BpfObject) -> None:
        """The tracepoint programs by section; the DNS programs at the cgroup v2 root."""
        obj.attach_all()
        names = [n for n in (*DNS_EGRESS, DNS_INGRESS) if n in obj.programs]
        if not names:
            return
        root = discover_roots().unified
        if root is None:
            for n in names:
                obj.skipped[n] = "no cgroup v2 hierarchy is mounted"
            return
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            for n in names:
                obj.skipped[n] = f"cannot open the cgroup v2 root {root}: {exc.strerror}"
            return
        try:
            for n in names:
                obj.attach_cgroup(n, fd)
        finally:
            os.close(fd)
        if DNS_INGRESS in obj.attached and obj.attached.intersection(DNS_EGRESS):
            self.dns.bind(obj)

    def on_config(self, kernel: TapioConfig, user: UserThresholds) -> None:
        self.dns.configure(kernel, user)

    def side_rings(self) -> Sequence[tuple[RingBuffer, Callable[[], None]]]:
        return self.dns.side_rings()

    async def run(self, emit: Emit) -> None:
        await self.dns.run(emit)

    def close(self) -> None:
        self.dns.close()

    def _addr(self, family: int, raw: bytes) -> str:
        v6 = family == AF_INET6
        cache = self._v6 if v6 else self._v4
        text = cache.get(raw)
        if text is None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            if v6:
                text = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                text = socket.inet_ntop(socket.AF_INET, raw[:4])
            cache[raw] = text
        return text

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        """A batch of ring frames: one row per record, then the occurrences in one pass."""
        return occurrences(self._rows(self.record.iter_frames(payload), self.ctx.boot_offset_ns))

    def classify_one(self, frame: tuple[Any, ...], boot_offset_ns: int) -> Occurrence | None:
        """One ring frame → its occurrence (or None, counted)."""
        rows = self._rows((frame,), boot_offset_ns)
        return new_occurrence(*rows[0], data_sorted=True) if rows else None

    def _rows(self, frames: Iterable[tuple[Any, ...]], boot_offset_ns: int) -> list[Row]:
        """Ring frames: (header_len, *network_event fields) → the occurrences' rows, in order
        (a record of a type this agent does not know is counted and has none).

        One loop for the batch with every memo and constant in a local: under a burst this runs
        for every record, and a call plus attribute lookups per record cost a fifth of it.
        ``data`` dicts are written in sorted key order (the contract's key order) so no sort
        is needed on this hot path; tests assert the order.
        """
        v4, v6, addr = self._v4, self._v6, self._addr
        comms, decode = self.strings.cache, self.strings.decode
        pid_sources, errno_names, states = PID_SOURCES, ERRNO_NAMES, TCP_STATES
        out: list[Row] = []
        append = out.append
        for (
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
            cg2,
            memcg,
            cpucg,
        ) in frames:
            if family == AF_INET6:
                cache, fam = v6, "ipv6"
            else:
                cache, fam = v4, "ipv4"
            src = cache.get(saddr) or addr(family, saddr)
            dst = cache.get(daddr) or addr(family, daddr)
            comm = comms.get(comm_raw) or decode(comm_raw)
            psrc = pid_sources.get(pid_source, "none")
            when = boot_offset_ns + ts
            # Before enrichment the first non-zero id stands for the cgroup; the enricher replaces
            # it with the id of the hierarchy that names the container.
            primary = cg2 or cpucg or memcg
            if ev_type == EV_CONN_REFUSED:
                append(
                    (
                        NETWORK_CONNECTION_REFUSED,
                        "warning",
                        "failure",
                        when,
                        "RST_RECEIVED",
                        f"TCP RST {src}:{sport} → {dst}:{dport}",
                        {
                            "cgroup2_id": cg2,
                            "cgroup_id": primary,
                            "cgroup_path": None,  # the enricher's
                            "comm": comm,
                            "config_generation": generation,
                            "connect_duration_ms": duration_ns // 1000 / 1000,
                            "cpu_cgroup_id": cpucg,
                            "dst_ip": dst,
                            "dst_port": dport,
                            "family": fam,
                            "memory_cgroup_id": memcg,
                            "pid": pid,
                            "pid_source": psrc,
                            "protocol": "tcp",
                            "reason": "rst" if flags & FLAG_RST else "icmp",
                            "src_ip": src,
                            "src_port": sport,
                            "tid": tid,
                            "timestamp_ns": ts,
                        },
                    )
                )
            elif ev_type == EV_CONN_TIMEOUT:
                append(
                    (
                        NETWORK_CONNECTION_TIMEOUT,
                        "error",
                        "failure",
                        when,
                        "SYN_TIMEOUT",
                        f"Connection timeout to {dst}:{dport} (SYN_SENT→CLOSE)",
                        {
                            "cgroup2_id": cg2,
                            "cgroup_id": primary,
                            "cgroup_path": None,  # the enricher's
                            "comm": comm,
                            "config_generation": generation,
                            "connect_duration_ms": duration_ns // 1000 / 1000,
                            "cpu_cgroup_id": cpucg,
                            "dst_ip": dst,
                            "dst_port": dport,
                            "error": errno_names.get(sk_err, f"errno {sk_err}"),
                            "family": fam,
                            "memory_cgroup_id": memcg,
                            "new_state": states.get(new_state, "UNKNOWN"),
                            "old_state": states.get(old_state, "UNKNOWN"),
                            "pid": pid,
                            "pid_source": psrc,
                            "protocol": "tcp",
                            "src_ip": src,
                            "src_port": sport,
                            "tid": tid,
                            "timestamp_ns": ts,
                        },
                    )
                )
            elif ev_type == EV_RETRANS_SPIKE:
                append(
                    (
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
                            "cgroup2_id": cg2,
                            "cgroup_id": primary,
                            "cgroup_path": None,  # the enricher's
                            "comm": comm,
                            "config_generation": generation,
                            "cpu_cgroup_id": cpucg,
                            "dst_ip": dst,
                            "dst_port": dport,
                            "family": fam,
                            "memory_cgroup_id": memcg,
                            "pid": pid,
                            "pid_source": psrc,
                            "protocol": "tcp",
                            "retransmits_in_window": retrans_count,
                            "snd_cwnd": snd_cwnd,
                            "src_ip": src,
                            "src_port": sport,
                            "tcp_state": states.get(old_state, "UNKNOWN"),
                            "tid": tid,
                            "timestamp_ns": ts,
                            "total_retrans": total_retrans,
                            "window_ms": duration_ns // 1000 / 1000,
                        },
                    )
                )
            elif ev_type == EV_RTT_SPIKE:
                append(
                    (
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
                            "cgroup2_id": cg2,
                            "cgroup_id": primary,
                            "cgroup_path": None,  # the enricher's
                            "comm": comm,
                            "config_generation": generation,
                            "cpu_cgroup_id": cpucg,
                            "current_ms": rtt_cur // 1000,
                            "current_us": rtt_cur,
                            "dst_ip": dst,
                            "dst_port": dport,
                            "family": fam,
                            "memory_cgroup_id": memcg,
                            "pid": pid,
                            "pid_source": psrc,
                            "protocol": "tcp",
                            "snd_cwnd": snd_cwnd,
                            "src_ip": src,
                            "src_port": sport,
                            "tid": tid,
                            "timestamp_ns": ts,
                        },
                    )
                )
            else:
                self.drop("unknown_record_type")  # a newer BPF object than this agent knows
        return out
