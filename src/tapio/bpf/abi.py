"""Python mirrors of the kernel ABI: ``struct tapio_config`` and a helper for event structs.

Each mirror lists its fields with explicit formats in declaration order and explicit padding,
so offsets are plain arithmetic; tests compare every offset and size with the BTF that clang
emitted into the objects (tests/unit/test_abi_layout.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

import msgspec


def _parse_fields(struct_name: str, table: str) -> list[tuple[str, str]]:
    """``name format`` on each line (blank lines ignored), in declaration order."""
    fields: list[tuple[str, str]] = []
    for line in table.splitlines():
        words = line.split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"{struct_name}: field line {line.strip()!r} is not 'name format'")
        fields.append((words[0], words[1]))
    return fields


class CStruct:
    """A packed little-endian layout built from (name, struct-format) pairs.

    The pairs may be given as a table, one ``name format`` per line, which reads like the C
    declaration it mirrors.

    Field names starting with ``_`` are padding and must be zero. ``offsets`` and ``sizes`` are
    what the layout tests compare against the C definition.
    """

    def __init__(self, name: str, fields: Sequence[tuple[str, str]] | str, size: int) -> None:
        self.name = name
        if isinstance(fields, str):
            fields = _parse_fields(name, fields)
        self.fields = tuple(fields)
        fmt = "<" + "".join(f for _, f in fields)
        self.struct = struct.Struct(fmt)
        if self.struct.size != size:
            raise AssertionError(f"{name}: layout is {self.struct.size} bytes, expected {size}")
        self.size = size
        self.offsets: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        off = 0
        for fname, f in fields:
            self.offsets[fname] = off
            self.sizes[fname] = struct.calcsize("<" + f)
            off += self.sizes[fname]
        # The ring buffer frames every record: an 8-byte header (u32 length, u32 page offset)
        # and the record padded to 8 bytes. ``frame`` decodes a whole run of frames in one C
        # call; its first item is the header length (validated by the consumer), then the
        # record's fields.
        self.stride = (8 + size + 7) & ~7
        self.frame = struct.Struct("<I4x" + fmt[1:] + f"{self.stride - 8 - size}x")
        # Index of each field in the unpacked tuple ("16s" is one item, "16i" is sixteen).
        self.index: dict[str, int] = {}
        i = 0
        for fname, f in fields:
            self.index[fname] = i
            i += len(struct.unpack("<" + f, bytes(struct.calcsize("<" + f))))

    def iter_unpack(self, payload: bytes | bytearray) -> Any:
        return self.struct.iter_unpack(payload)

    def iter_frames(self, frames: bytes | bytearray) -> Any:
        """Decode ring frames (see ``frame``): tuples of (header_len, *fields)."""
        return self.frame.iter_unpack(frames)

    def framed(self, *records: bytes) -> bytes:
        """Frame raw records the way the ring buffer does (tests, recorded bytes)."""
        pad = bytes(self.stride - 8 - self.size)
        return b"".join(
            len(r).to_bytes(4, "little") + bytes(4) + r[: self.size] + pad for r in records
        )


TAPIO_CONFIG_ABI_VERSION = 4
CONFIG_SIZE = 256
MAX_IGNORE_EXIT_CODES = 16

# ``tapio_config.flags``: one bit per observer, by the observer's name.
OBSERVER_FLAGS: Final = {
    "network": 1 << 0,
    "storage": 1 << 1,
    "container": 1 << 2,
    "node": 1 << 3,
}
FLAG_NETWORK = OBSERVER_FLAGS["network"]
FLAG_STORAGE = OBSERVER_FLAGS["storage"]
FLAG_CONTAINER = OBSERVER_FLAGS["container"]
FLAG_NODE = OBSERVER_FLAGS["node"]

EXIT_SCOPE_CONTAINERS = 1 << 0

DNS_ENABLED = 1 << 0
DNS_NXDOMAIN = 1 << 1
MAX_DNS_PORTS = 8

# tapio_metrics indices (bpf/tapio_common.h)
METRIC_LOST = 0
METRIC_ABI_MISMATCH = 1
METRIC_LOST_REFUSED = 2
# The slots that count lost records -> their reason label on tapio_lost_events_total: the ring
# was full (the agent did not drain in time), or it refused a reserve twice with room shown.
LOST_REASONS = {METRIC_LOST: "ring_full", METRIC_LOST_REFUSED: "reserve_refused"}
METRIC_OBSERVER_BASE = 8
METRIC_MAX = 32

TAPIO_CONFIG = CStruct(
    "tapio_config",
    """
    abi_version               I
    generation                I
    flags                     Q
    slow_io_threshold_ns      Q
    io_latency_critical_ns    Q
    retransmit_window_ns      Q
    retransmit_threshold      I
    rtt_spike_multiplier      I
    rtt_spike_abs_us          I
    rtt_min_baseline_samples  I
    rtt_min_delta_us          I
    rtt_sample_interval_us    I
    exit_flags                I
    ignore_exit_count         I
    ignore_exit_codes         16i
    ignore_signal_mask        Q
    runq_latency_threshold_ns Q
    dns_slow_ns               Q
    dns_timeout_ns            Q
    dns_flags                 I
    dns_port_count            I
    dns_ports                 8H
    _reserved                 64x
    """,
    CONFIG_SIZE,
)

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class TapioConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The values written into every object's ``tapio_config`` carrier (all-zeros is inert)."""

    abi_version: int = TAPIO_CONFIG_ABI_VERSION
    generation: int = 0
    flags: int = 0
    slow_io_threshold_ns: int = 0
    io_latency_critical_ns: int = 0
    retransmit_window_ns: int = 0
    retransmit_threshold: int = 0
    rtt_spike_multiplier: int = 0
    rtt_spike_abs_us: int = 0
    rtt_min_baseline_samples: int = 0
    rtt_min_delta_us: int = 0
    rtt_sample_interval_us: int = 0
    exit_flags: int = 0
    ignore_exit_codes: tuple[int, ...] = ()
    ignore_signal_mask: int = 0
    runq_latency_threshold_ns: int = 0
    dns_slow_ns: int = 0
    dns_timeout_ns: int = 0
    dns_flags: int = 0
    dns_ports: tuple[int, ...] = ()

    def pack(self) -> bytes:
        """The exact 256 bytes for the map value; integers are clamped to their C types."""
        codes = list(self.ignore_exit_codes[:MAX_IGNORE_EXIT_CODES])
        count = len(codes)
        codes += [0] * (MAX_IGNORE_EXIT_CODES - count)
        ports = [p for p in self.dns_ports if 0 < p <= 0xFFFF][:MAX_DNS_PORTS]
        nports = len(ports)
        ports += [0] * (MAX_DNS_PORTS - nports)

        def u32(v: int) -> int:
            return max(0, min(v, _U32_MAX))

        def u64(v: int) -> int:
            return max(0, min(v, _U64_MAX))

        def s32(v: int) -> int:
            return max(-(2**31), min(v, 2**31 - 1))

        return TAPIO_CONFIG.struct.pack(
            u32(self.abi_version),
            u32(self.generation),
            u64(self.flags),
            u64(self.slow_io_threshold_ns),
            u64(self.io_latency_critical_ns),
            u64(self.retransmit_window_ns),
            u32(self.retransmit_threshold),
            u32(self.rtt_spike_multiplier),
            u32(self.rtt_spike_abs_us),
            u32(self.rtt_min_baseline_samples),
            u32(self.rtt_min_delta_us),
            u32(self.rtt_sample_interval_us),
            u32(self.exit_flags),
            count,
            *(s32(c) for c in codes),
            u64(self.ignore_signal_mask),
            u64(self.runq_latency_threshold_ns),
            u64(self.dns_slow_ns),
            u64(self.dns_timeout_ns),
            u32(self.dns_flags),
            nports,
            *ports,
        )


INERT_CONFIG = bytes(CONFIG_SIZE)
