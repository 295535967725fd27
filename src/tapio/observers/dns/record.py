"""The DNS records of the network object (bpf/network.h) and the question decoder.

``dns_event`` is what the kernel sends for a failed or slow answer; it embeds the pending map's
key (``dns_key``) and value (``dns_query``) byte for byte, so the agent's sweep builds the very
same record for a query that expired unanswered (:func:`timeout_record`). The kernel copies the
question section raw; turning it into a name happens here, where a malformed one is a counted
drop and never an exception that leaves this module.
"""

from __future__ import annotations

from typing import NamedTuple

from tapio.bpf.abi import CStruct

QRAW_LEN = 128

DNS_KEY = CStruct(
    "dns_key",
    [
        ("client", "16s"),
        ("server", "16s"),
        ("client_port", "H"),
        ("server_port", "H"),
        ("dns_id", "H"),
        ("family", "B"),
        ("proto", "B"),
    ],
    40,
)

DNS_QUERY = CStruct(
    "dns_query",
    [
        ("sent_ns", "Q"),
        ("cgroup_id", "Q"),
        ("pid", "I"),
        ("tid", "I"),
        ("pid_source", "B"),
        ("qraw_len", "B"),
        ("qflags", "H"),
        ("_pad", "4x"),
        ("comm", "16s"),
        ("qraw", f"{QRAW_LEN}s"),
    ],
    176,
)

#: struct dns_event: header, then the pending map's key and value in place, then the answer.
EVENT_HEAD = (("timestamp_ns", "Q"), ("config_generation", "I"), ("_pad0", "4x"))
EVENT_TAIL = (
    ("latency_ns", "Q"),
    ("event_type", "B"),
    ("rcode", "B"),
    ("aflags", "H"),
    ("_pad1", "4x"),
)
DNS_EVENT = CStruct(
    "dns_event", [*EVENT_HEAD, *DNS_KEY.fields, *DNS_QUERY.fields, *EVENT_TAIL], 248
)
KEY_OFFSET = 16
QUERY_OFFSET = KEY_OFFSET + DNS_KEY.size

EV_ERROR = 1
EV_SLOW = 2
EV_TIMEOUT = 3

PID_SOURCES = {0: "unavailable", 1: "sender", 2: "tcp_transmit", 3: "not_owner"}

IPPROTO_TCP = 6
IPPROTO_UDP = 17

RCODES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
}

QTYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    43: "DS",
    48: "DNSKEY",
    64: "SVCB",
    65: "HTTPS",
    255: "ANY",
}

#: Longest name reported, in characters (a full DNS name is at most 253).
MAX_NAME = 253


class MalformedQuestion(ValueError):
    """The question section is not a DNS name (the record is dropped and counted)."""


class Question(NamedTuple):
    name: str
    qtype: int  # 0 when the copy ended before the type
    truncated: bool  # the kernel's copy ended inside the name


_PRINTABLE = bytes(range(0x21, 0x7F))


def _label_text(label: bytes) -> str:
    """Lower-cased, printable: other bytes become ``\\DDD`` (the zone-file escape)."""
    out = []
    for b in label.lower():
        if b in _PRINTABLE and b not in b".\\":
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def decode_question(raw: bytes, length: int) -> Question:
    """The queried name and type from the first ``length`` bytes of a question section.

    A question never uses compression pointers and no label is longer than 63 bytes; either,
    an empty copy, or a name over 255 wire bytes is :class:`MalformedQuestion`. A name the copy
    cut short is returned as far as it went, flagged ``truncated``; so is one whose text (with
    escapes) is longer than :data:`MAX_NAME` characters, cut there.
    """
    if length <= 0 or length > len(raw):
        raise MalformedQuestion("empty question")
    data = raw[:length]
    labels: list[str] = []
    pos = 0
    qtype = 0
    truncated = True
    while pos < length:
        n = data[pos]
        if n == 0:
            pos += 1
            truncated = False
            if pos + 2 <= length:
                qtype = int.from_bytes(data[pos : pos + 2], "big")
            break
        if n & 0xC0:
            raise MalformedQuestion("compression pointer or reserved label type in a question")
        labels.append(_label_text(data[pos + 1 : pos + 1 + n]))
        pos += 1 + n
        if pos > 255:
            raise MalformedQuestion("name longer than 255 bytes")
    name = ".".join(labels) or "."
    if len(name) > MAX_NAME:
        name, truncated = name[:MAX_NAME], True
    return Question(name, qtype, truncated)


def timeout_record(key: bytes, query: bytes, now_ns: int, generation: int) -> bytes:
    """A ``dns_event`` for a query the sweep expired: the kernel's layout, built here."""
    sent = int.from_bytes(query[:8], "little")
    tail = max(0, now_ns - sent).to_bytes(8, "little") + bytes([EV_TIMEOUT, 0, 0, 0]) + bytes(4)
    head = now_ns.to_bytes(8, "little") + generation.to_bytes(4, "little") + bytes(4)
    return head + key + query + tail
