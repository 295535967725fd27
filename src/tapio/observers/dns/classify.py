"""One ``dns_event`` → the facts of a DNS occurrence (type, severity, message, sorted data).

The kernel decided which fact happened (an error RCODE, a late answer, or — in the sweep — no
answer); this is formatting. The flood key says which failures are "the same" for
:mod:`tapio.observers.dns.flood`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, NamedTuple

from tapio.observers.dns.record import (
    DNS_EVENT,
    EV_ERROR,
    EV_SLOW,
    EV_TIMEOUT,
    IPPROTO_TCP,
    PID_SOURCES,
    QTYPES,
    RCODES,
    MalformedQuestion,
    decode_question,
)
from tapio.occurrence import (
    NETWORK_DNS_ERROR,
    NETWORK_DNS_SLOW,
    NETWORK_DNS_TIMEOUT,
    Occurrence,
    Outcome,
    Severity,
    new_occurrence,
)

AF_INET6 = 10
_I = DNS_EVENT.index

FloodKey = tuple[str, str, str, str, int, int]


class Classified(NamedTuple):
    key: FloodKey  # (type, name, server, transport, rcode, cgroup id)
    occurrence: Occurrence


def _addr(family: int, raw: bytes) -> str:
    if family == AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


def classify_event(
    fields: tuple[Any, ...],
    boot_offset_ns: int,
    comm: Callable[[bytes], str],
    drop: Callable[[str], None],
) -> Classified | None:
    """Decoded ``dns_event`` fields (``DNS_EVENT.struct`` order) → its occurrence, or None
    with the reason counted through ``drop``."""
    ev_type = fields[_I["event_type"]]
    if ev_type not in (EV_ERROR, EV_SLOW, EV_TIMEOUT):
        drop("unknown_record_type")
        return None
    family = fields[_I["family"]]
    if family not in (2, AF_INET6):
        drop("dns_malformed_record")
        return None
    try:
        q = decode_question(fields[_I["qraw"]], fields[_I["qraw_len"]])
    except MalformedQuestion:
        drop("dns_malformed_question")
        return None
    client = _addr(family, fields[_I["client"]])
    server = _addr(family, fields[_I["server"]])
    server_port = fields[_I["server_port"]]
    rcode = fields[_I["rcode"]]
    cgroup_id = fields[_I["cgroup_id"]]
    latency_ns = fields[_I["latency_ns"]]
    ts = fields[_I["timestamp_ns"]]
    pid_source = PID_SOURCES.get(fields[_I["pid_source"]], "unavailable")
    owned = pid_source in ("sender", "tcp_transmit")
    qtype = QTYPES.get(q.qtype, f"TYPE{q.qtype}" if q.qtype else "UNKNOWN")
    latency_ms = latency_ns // 1000 / 1000
    data: dict[str, Any] = {
        "cgroup2_id": cgroup_id,
        "client_ip": client,
        "client_port": fields[_I["client_port"]],
        "comm": comm(fields[_I["comm"]]) if owned else "",
        "config_generation": fields[_I["config_generation"]],
        "count": 1,
        "dns_id": fields[_I["dns_id"]],
        "family": "ipv6" if family == AF_INET6 else "ipv4",
        "latency_ms": latency_ms,
        "pid": fields[_I["pid"]] if owned else 0,
        "pid_source": pid_source,
        "query_name": q.name,
        "query_name_truncated": q.truncated,
        "query_type": qtype,
        "query_type_code": q.qtype,
    }
    if ev_type != EV_TIMEOUT:
        data["rcode"] = RCODES.get(rcode, f"RCODE{rcode}")
        data["rcode_code"] = rcode
    data["server_ip"] = server
    data["server_port"] = server_port
    data["tid"] = fields[_I["tid"]] if owned else 0
    data["timestamp_ns"] = ts
    data["transport"] = "tcp" if fields[_I["proto"]] == IPPROTO_TCP else "udp"
    where = f"{server}:{server_port}"
    severity: Severity
    outcome: Outcome
    when = boot_offset_ns + ts
    if ev_type == EV_ERROR:
        rname = data["rcode"]
        type_, severity, outcome, code = NETWORK_DNS_ERROR, "warning", "failure", rname
        message = f"DNS {rname} for {q.name} {qtype} from {where}"
    elif ev_type == EV_SLOW:
        type_, severity, outcome, code = NETWORK_DNS_SLOW, "warning", "success", "DNS_SLOW"
        message = f"DNS answer for {q.name} {qtype} from {where} took {latency_ms:g} ms"
        rcode = 0
    else:
        type_, severity, outcome, code = NETWORK_DNS_TIMEOUT, "error", "timeout", "DNS_TIMEOUT"
        message = f"DNS query for {q.name} {qtype} to {where}: no answer in {latency_ms:g} ms"
        rcode = -1
    occ = new_occurrence(type_, severity, outcome, when, code, message, data, data_sorted=True)
    return Classified((type_, q.name, where, data["transport"], rcode, cgroup_id), occ)
