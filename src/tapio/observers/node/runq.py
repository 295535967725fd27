"""Run-queue latency: the kernel's aggregates (bpf/node.h) and their arithmetic.

``node.bpf.c`` stamps every wakeup and measures the wait until the task runs, into a per-CPU
log2 histogram (``runq_hist``) and the interval's longest wait per CPU (``runq_worst``). The
observer reads both each tick; everything here is pure decoding of those maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from tapio.bpf.abi import CStruct
from tapio.metrics import REGISTRY

RUNQ_SLOTS = 24
RUNQ_HIST = CStruct(
    "runq_hist",
    f"""
    waits           Q
    wait_ns         Q
    over            Q
    throttled_waits Q
    throttled_ns    Q
    slots           {RUNQ_SLOTS}Q
    """,
    232,
)
RUNQ_WORST = CStruct(
    "runq_worst",
    """
    max_ns            Q
    cgroup_id         Q
    timestamp_ns      Q
    pid               I
    tid               I
    config_generation I
    _pad              4x
    comm              16s
    """,
    56,
)


#: The kernel's run-queue aggregates as counters: ``runqueue`` waits are run-queue latency,
#: ``throttled`` ones were CFS-quota throttling, told apart in the kernel and left out of it.
RUNQ_WAITS = Counter(
    "tapio_node_runq_waits_total",
    "Waits measured by the run-queue hook, by kind (runqueue, or throttled: excluded)",
    ["kind"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class RunqTotals:
    waits: int
    wait_ns: int
    over: int
    throttled_waits: int
    throttled_ns: int
    slots: tuple[int, ...]

    @classmethod
    def zero(cls) -> RunqTotals:
        return cls(0, 0, 0, 0, 0, (0,) * RUNQ_SLOTS)

    def minus(self, prev: RunqTotals) -> RunqTotals:
        return RunqTotals(
            self.waits - prev.waits,
            self.wait_ns - prev.wait_ns,
            self.over - prev.over,
            self.throttled_waits - prev.throttled_waits,
            self.throttled_ns - prev.throttled_ns,
            tuple(a - b for a, b in zip(self.slots, prev.slots, strict=True)),
        )


def sum_runq_hist(raw: bytes) -> RunqTotals:
    """Sum a PERCPU_ARRAY lookup of ``struct runq_hist`` (every CPU's slot back to back)."""
    waits = wait_ns = over = tw = tn = 0
    slots = [0] * RUNQ_SLOTS
    for rec in RUNQ_HIST.iter_unpack(raw):
        waits += rec[0]
        wait_ns += rec[1]
        over += rec[2]
        tw += rec[3]
        tn += rec[4]
        for i in range(RUNQ_SLOTS):
            slots[i] += rec[5 + i]
    return RunqTotals(waits, wait_ns, over, tw, tn, tuple(slots))


def slot_upper_ns(slot: int) -> int:
    """Upper bound of histogram slot ``slot``: [2^i, 2^(i+1)) × 1024 ns."""
    return (1 << (slot + 1)) * 1024


def percentile_ns(slots: Sequence[int], q: float) -> int:
    """Upper bound of the slot holding the ``q`` quantile (coarse: log2 buckets)."""
    total = sum(slots)
    if total <= 0:
        return 0
    rank = q * total
    seen = 0
    for i, n in enumerate(slots):
        seen += n
        if seen >= rank:
            return slot_upper_ns(i)
    return slot_upper_ns(len(slots) - 1)


@dataclass(frozen=True, slots=True)
class WorstWait:
    max_ns: int
    cgroup_id: int
    timestamp_ns: int
    pid: int
    tid: int
    config_generation: int
    comm: str
    cpu: int


def worst_of(raw: bytes) -> WorstWait | None:
    """The longest wait over every CPU's ``struct runq_worst`` slot, None when all are empty."""
    best: WorstWait | None = None
    for cpu, rec in enumerate(RUNQ_WORST.iter_unpack(raw)):
        max_ns, cgid, ts, pid, tid, gen, comm = rec
        if max_ns and (best is None or max_ns > best.max_ns):
            text = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
            best = WorstWait(max_ns, cgid, ts, pid, tid, gen, text, cpu)
    return best
