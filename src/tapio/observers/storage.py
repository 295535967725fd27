"""Storage observer: parse ``struct storage_event`` (bpf/storage.h) and classify it.

The kernel correlates ``block_rq_issue`` with ``block_rq_complete`` (bpf/storage.bpf.c) and sends
only requests that failed (``kernel.storage.io_error``) or crossed a latency threshold
(``kernel.storage.latency_spike``: warning above ``slow_io_threshold_ns``, critical above
``io_latency_critical_ns``). The issuing pid, tid, comm and cgroups are captured at **issue**
time (completions run in softirq or driver workers).

By design only reads and writes are tracked: discards, secure erases, pure flushes and other
operations (``N``) are ignored; a flush-prefixed write (``FW…``) is a write.

Missing evidence is counted, never guessed: a completion whose key (dev, sector, nr_sector, op)
was issued twice while inflight is dropped as
``tapio_correlation_drops_total{observer="storage",reason="ambiguous_inflight_io"}``; a completion
without an issue record (evicted, issued before attach, partial completion) as
``reason="unmatched_completion"``.

The issuer's cgroup ids are facts (``cgroup2_id``, ``memory_cgroup_id``); the enrichment stage
(:class:`tapio.agent.pipeline.Enricher`) adds the cgroup path and the container it names.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any, ClassVar

from tapio.bpf.abi import METRIC_OBSERVER_BASE, CStruct
from tapio.bpf.features import ProgramSpec
from tapio.observers.base import Observer, ObserverContext
from tapio.observers.cgroups import ByCgroupId, Enrichment
from tapio.occurrence import (
    STORAGE_IO_ERROR,
    STORAGE_LATENCY_SPIKE,
    Occurrence,
    new_occurrence,
)

STORAGE_EVENT = CStruct(
    "storage_event",
    """
    timestamp_ns      Q
    latency_ns        Q
    cgroup_id         Q
    memcg_id          Q
    sector            Q
    dev_major         I
    dev_minor         I
    bytes             I
    nr_sector         I
    config_generation I
    pid               I
    tid               I
    error_code        i
    rwbs              8s
    opcode            B
    severity          B
    _pad0             2x
    _pad1             4x
    comm              16s
    """,
    104,
)

IO_KEY = CStruct(
    "io_key",
    """
    dev       I
    nr_sector I
    sector    Q
    opcode    B
    _pad      7x
    """,
    24,
)

IO_VALUE = CStruct(
    "io_value",
    """
    issue_ns  Q
    cgroup_id Q
    memcg_id  Q
    pid       I
    tid       I
    bytes     I
    ambiguous B
    requeued  B
    _pad      2x
    comm      16s
    rwbs      8s
    """,
    64,
)

IO_SET = CStruct(
    "io_set",
    """
    owner 32s
    key   96s
    val   256s
    """,
    384,
)

OP_READ = 0
OP_WRITE = 1
OP_NAMES = {OP_READ: "read", OP_WRITE: "write"}

SEV_WARNING = 1
SEV_CRITICAL = 2

METRIC_AMBIGUOUS = METRIC_OBSERVER_BASE + 0
METRIC_UNMATCHED = METRIC_OBSERVER_BASE + 1

_CACHE_MAX = 4096
_NEGATIVE_TTL = 5.0
_ORDER = ("unified", "memory")  # hierarchies the record names, best first


def dev_major(dev: int) -> int:
    return dev >> 20


def dev_minor(dev: int) -> int:
    return dev & 0xFFFFF


def errno_name(err: int) -> str:
    return errno.errorcode.get(-err, f"errno {err}") if err < 0 else f"errno {err}"


class DeviceNames:
    """(major, minor) → kernel device name from ``/sys/dev/block/<maj>:<min>/uevent``, cached."""

    def __init__(self, sysfs: Path = Path("/sys/dev/block"), maxsize: int = _CACHE_MAX) -> None:
        self.sysfs = sysfs
        self.maxsize = maxsize
        self._names: dict[tuple[int, int], str] = {}
        self._missing: dict[tuple[int, int], float] = {}
        self.reads = 0

    def name(self, major: int, minor: int) -> str | None:
        key = (major, minor)
        hit = self._names.get(key)
        if hit is not None:
            return hit
        now = time.monotonic()
        miss = self._missing.get(key)
        if miss is not None and now - miss < _NEGATIVE_TTL:
            return None
        self.reads += 1
        found: str | None = None
        try:
            for line in (self.sysfs / f"{major}:{minor}" / "uevent").read_text().splitlines():
                if line.startswith("DEVNAME="):
                    found = line.split("=", 1)[1].strip() or None
                    break
        except OSError:
            found = None
        if found is None:
            if len(self._missing) >= self.maxsize:
                self._missing.clear()
            self._missing[key] = now
            return None
        if len(self._names) >= self.maxsize:
            self._names.clear()
        self._names[key] = found
        return found


_BOTH = (STORAGE_IO_ERROR, STORAGE_LATENCY_SPIKE)
_SLOTS = ("io_slots",)
_LRU = ("inflight",)


class StorageObserver(Observer):
    name = "storage"
    object_name = "storage"
    record = STORAGE_EVENT
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {
        METRIC_AMBIGUOUS: ("correlation_drop", "ambiguous_inflight_io"),
        METRIC_UNMATCHED: ("correlation_drop", "unmatched_completion"),
    }
    # Both anomaly types need the issue (who, when) and the completion (error, latency). Each
    # hook has alternatives, tried in order: the slot table (tp_btf, BPF atomics: 5.12+), then
    # the LRU map (tp_btf completion, classic issue and requeue tracepoints: 5.10 and 5.11). The
    # slot programs work only together: one of them left out takes the others with it.
    programs: ClassVar[tuple[ProgramSpec, ...]] = (
        ProgramSpec(
            "handle_rq_issue_slot",
            "block_rq_issue",
            _BOTH,
            group="issue",
            maps=_SLOTS,
            needs=("handle_rq_complete_slot", "handle_rq_requeue_slot"),
        ),
        ProgramSpec("handle_rq_issue", "block_rq_issue", _BOTH, group="issue", maps=_LRU),
        ProgramSpec(
            "handle_rq_complete_slot",
            "block_rq_complete",
            _BOTH,
            group="complete",
            maps=_SLOTS,
            needs=("handle_rq_issue_slot", "handle_rq_requeue_slot"),
        ),
        ProgramSpec(
            "handle_rq_complete_btf", "block_rq_complete", _BOTH, group="complete", maps=_LRU
        ),
        ProgramSpec("handle_rq_complete", "block_rq_complete", _BOTH, group="complete", maps=_LRU),
        # Keeps a requeued request from looking like a second issue; optional accuracy aid.
        ProgramSpec(
            "handle_rq_requeue_slot",
            "block_rq_requeue",
            group="requeue",
            maps=_SLOTS,
            needs=("handle_rq_issue_slot", "handle_rq_complete_slot"),
        ),
        ProgramSpec("handle_rq_requeue", "block_rq_requeue", group="requeue", maps=_LRU),
    )

    enrichment: ClassVar[dict[str, Enrichment]] = {
        STORAGE_IO_ERROR: ByCgroupId(_ORDER, _ORDER),
        STORAGE_LATENCY_SPIKE: ByCgroupId(_ORDER, _ORDER),
    }

    def __init__(self, ctx: ObserverContext, devices: DeviceNames | None = None) -> None:
        super().__init__(ctx)
        self.devices = devices if devices is not None else DeviceNames()

    def classify_one(self, frame: tuple[Any, ...], boot_offset_ns: int) -> Occurrence | None:
        """One ring frame: (header length, *record fields) → occurrence or None."""
        (
            _hdr,
            ts,
            latency_ns,
            cg2,
            memcg,
            sector,
            major,
            minor,
            nbytes,
            nr_sector,
            generation,
            pid,
            tid,
            error_code,
            rwbs,
            opcode,
            severity,
            comm,
        ) = frame
        op = OP_NAMES.get(opcode)
        if op is None:
            self.drop("unknown_record_type")  # the kernel only sends reads and writes
            return None
        if error_code == 0 and severity not in (SEV_WARNING, SEV_CRITICAL):
            self.drop("not_an_anomaly")  # neither failed nor slow: the kernel filters these
            return None
        device = self.devices.name(major, minor)
        latency_ms = latency_ns / 1e6
        data: dict[str, object] = {
            "bytes": nbytes,
            "cgroup2_id": cg2,
            "cgroup_id": cg2 or memcg,  # the enricher names the cgroup that describes it best
            "cgroup_path": None,
            "comm": self.strings.decode(comm),
            "config_generation": generation,
            "dev_major": major,
            "dev_minor": minor,
            "device": device,
            "error_code": error_code,
            "latency_ms": latency_ms,
            "latency_ns": latency_ns,
            "memory_cgroup_id": memcg,
            "nr_sector": nr_sector,
            "opcode": op,
            "pid": pid,
            "pid_source": "issue",
            "rwbs": self.strings.decode(rwbs),
            "sector": sector,
            "tid": tid,
            "timestamp_ns": ts,
        }
        when = boot_offset_ns + ts
        if error_code != 0:
            data["error"] = errno_name(error_code)
            return new_occurrence(
                STORAGE_IO_ERROR,
                "critical",
                "failure",
                timestamp_ns=when,
                code="IO_ERROR",
                message=f"I/O error on {major}:{minor} (error={error_code}, {op})",
                data=data,
            )
        return new_occurrence(
            STORAGE_LATENCY_SPIKE,
            "critical" if severity == SEV_CRITICAL else "warning",
            "in_progress",
            timestamp_ns=when,
            code="LATENCY_SPIKE",
            message=f"I/O latency {latency_ms:.1f}ms on {major}:{minor} ({op})",
            data=data,
        )
