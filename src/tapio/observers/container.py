"""Container observer: parse ``struct container_event`` (bpf/container.h) and classify it.

The kernel already decided what happened and filtered the rest (bpf/container.bpf.c):

* ``kernel.container.oom_kill`` — one per OOM kill. Usage is the victim's anon + file + shmem
  RSS from the ``mark_victim`` tracepoint (kB → bytes); absent (``null``) on kernels whose
  tracepoint does not carry it. The victim's own SIGKILL death is suppressed **in the kernel**
  (``oom_victims`` map, counted as ``tapio_kernel_drops_total{reason="oom_victim_exit"}``), so it
  is never reported a second time as an abnormal exit.
* ``kernel.container.abnormal_exit`` — one per process (the thread that ends the thread group),
  exit code and fatal signal decoded, core-dump bit as a fact. Ignore lists and the scope knob
  are applied in the kernel.

Cgroups: the record carries the task's cgroup2 id and its v1 memory and cpu cgroup ids (on a
pure cgroup2 host all three name the same cgroup); they are facts (``cgroup2_id``,
``memory_cgroup_id``, ``cpu_cgroup_id``). The enrichment stage
(:class:`tapio.agent.pipeline.Enricher`) turns them into ``cgroup_path``, ``cgroup_id`` — the id
of the cgroup that describes the process best: for an OOM kill the memory cgroup (whose limit is
reported), for an exit the cgroup2 cgroup, each falling back to the next hierarchy where the
task is not in the root — and the container id, runtime and pod UID. When the OOM victim was not
the task running the tracepoint, the kernel did not see its cgroups: the observer says
``cgroup_source: "unknown"`` and the enricher reads ``/proc/<pid>/cgroup`` if the process still
exists (``cgroup_source: "proc"``); otherwise they stay unknown (``cgroup_path: null``) — never
guessed. A limit the kernel did not report is read from the memory cgroup's limit file by the
enricher too.
"""

from __future__ import annotations

import os
import signal as _signal
from collections.abc import Mapping
from typing import Any, ClassVar

from tapio.bpf.abi import METRIC_OBSERVER_BASE, CStruct
from tapio.bpf.features import ProgramSpec
from tapio.observers.base import Observer
from tapio.observers.cgroups import U64_MAX, ByCgroupId, Enrichment
from tapio.occurrence import (
    CONTAINER_ABNORMAL_EXIT,
    CONTAINER_OOM_KILL,
    Occurrence,
    new_occurrence,
)

CONTAINER_EVENT = CStruct(
    "container_event",
    """
    timestamp_ns       Q
    cgroup_id          Q
    memcg_id           Q
    cpu_cgroup_id      Q
    memory_usage_bytes Q
    memory_limit_pages Q
    total_vm_kb        Q
    anon_rss_kb        Q
    file_rss_kb        Q
    shmem_rss_kb       Q
    config_generation  I
    pid                I
    tid                I
    exit_code          i
    signal             i
    raw_status         I
    event_type         B
    flags              B
    oom_score_adj      h
    uid                I
    comm               16s
    """,
    128,
)

EV_OOM_KILL = 1
EV_EXIT = 2

FLAG_CORE_DUMPED = 1 << 0
FLAG_TASK_CGROUPS = 1 << 1
FLAG_RSS_FIELDS = 1 << 2
FLAG_GROUP_FALLBACK = 1 << 3
FLAG_LIMIT_VALID = 1 << 4

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_COUNTER_MAX = (2**63 - 1) // PAGE_SIZE  # the kernel's "max" for a page_counter

_MB = 1 << 20

SIGNAL_NAMES: dict[int, str] = {}
for _s in _signal.Signals:
    SIGNAL_NAMES.setdefault(int(_s), _s.name)

# Which hierarchies describe the process best, per event type.
_OOM_ORDER = ("memory", "unified", "cpu")
_EXIT_ORDER = ("unified", "memory", "cpu")


def signal_name(sig: int) -> str:
    name = SIGNAL_NAMES.get(sig)
    if name is not None:
        return name
    if _signal.SIGRTMIN <= sig <= _signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - _signal.SIGRTMIN}"
    return f"SIG{sig}"


def limit_bytes_from_pages(pages: int) -> int:
    if pages >= PAGE_COUNTER_MAX:
        return U64_MAX
    return pages * PAGE_SIZE


def oom_message(data: Mapping[str, Any]) -> str:
    """The OOM kill's message, from its facts (re-rendered when enrichment finds the limit)."""
    usage = data.get("memory_usage_bytes") or 0
    limit = data.get("memory_limit_bytes") or 0
    return f"OOM kill pid={data['pid']} (usage={usage // _MB}MB, limit={limit // _MB}MB)"


def _primary_id(ids: dict[str, int], order: tuple[str, ...]) -> int:
    """Before enrichment: the first id the kernel gave, in the occurrence's hierarchy order."""
    for h in order:
        if ids[h]:
            return ids[h]
    return 0


class ContainerObserver(Observer):
    name = "container"
    object_name = "container"
    record = CONTAINER_EVENT
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {
        METRIC_OBSERVER_BASE + 0: ("kernel_drop", "oom_victim_exit"),
        METRIC_OBSERVER_BASE + 1: ("kernel_drop", "exit_ignored"),
    }
    programs: ClassVar[tuple[ProgramSpec, ...]] = (
        ProgramSpec("handle_mark_victim", "oom_mark_victim", (CONTAINER_OOM_KILL,)),
        # One body built twice: plain loads through the BTF-typed task (5.11+), else probe reads.
        ProgramSpec(
            "handle_process_exit_btf", "process_exit", (CONTAINER_ABNORMAL_EXIT,), group="exit"
        ),
        ProgramSpec(
            "handle_process_exit", "process_exit", (CONTAINER_ABNORMAL_EXIT,), group="exit"
        ),
    )

    enrichment: ClassVar[dict[str, Enrichment]] = {
        CONTAINER_OOM_KILL: ByCgroupId(
            ("unified", "memory", "cpu"),
            _OOM_ORDER,
            proc_fallback=True,
            memory_limit=True,
            message=oom_message,
        ),
        CONTAINER_ABNORMAL_EXIT: ByCgroupId(
            ("unified", "memory", "cpu"), _EXIT_ORDER, proc_fallback=True, memory_limit=True
        ),
    }

    def classify_one(self, frame: tuple[Any, ...], boot_offset_ns: int) -> Occurrence | None:
        """One ring frame: (header length, *record fields) → occurrence or None."""
        (
            _hdr,
            ts,
            cg2,
            memcg,
            cpucg,
            usage,
            limit_pages,
            total_vm_kb,
            anon_kb,
            file_kb,
            shmem_kb,
            generation,
            pid,
            tid,
            exit_code,
            sig,
            raw_status,
            ev_type,
            flags,
            score_adj,
            uid,
            comm,
        ) = frame
        if ev_type not in (EV_OOM_KILL, EV_EXIT):
            self.drop("unknown_record_type")  # a newer BPF object than this agent knows
            return None
        order = _OOM_ORDER if ev_type == EV_OOM_KILL else _EXIT_ORDER
        task = bool(flags & FLAG_TASK_CGROUPS)
        ids = {"unified": cg2, "memory": memcg, "cpu": cpucg}
        limit = limit_bytes_from_pages(limit_pages) if flags & FLAG_LIMIT_VALID else None
        data: dict[str, object] = {
            "cgroup2_id": cg2,
            "cgroup_id": _primary_id(ids, order),
            "cgroup_path": None,  # the enricher's
            "cgroup_source": "task" if task else "unknown",
            "comm": self.strings.decode(comm),
            "config_generation": generation,
            "cpu_cgroup_id": cpucg,
            "memory_cgroup_id": memcg,
            "memory_limit_bytes": limit,
            "pid": pid,
            "tid": tid,
            "timestamp_ns": ts,
        }
        when = boot_offset_ns + ts
        if ev_type == EV_OOM_KILL:
            usage_known = bool(flags & FLAG_RSS_FIELDS)
            data["memory_usage_bytes"] = usage if usage_known else None
            data["exit_code"] = 137
            data["signal"] = 9
            data["signal_name"] = "SIGKILL"
            if usage_known:
                data["anon_rss_kb"] = anon_kb
                data["file_rss_kb"] = file_kb
                data["shmem_rss_kb"] = shmem_kb
                data["total_vm_kb"] = total_vm_kb
            data["oom_score_adj"] = score_adj
            data["uid"] = uid
            return new_occurrence(
                CONTAINER_OOM_KILL,
                "critical",
                "failure",
                timestamp_ns=when,
                code="OOM_KILL",
                message=oom_message(data),
                data=data,
            )
        data["memory_usage_bytes"] = None  # not sampled at exit
        data["exit_code"] = exit_code
        data["signal"] = sig
        data["core_dumped"] = bool(flags & FLAG_CORE_DUMPED)
        data["raw_status"] = raw_status
        if sig:
            data["signal_name"] = signal_name(sig)
        if flags & FLAG_GROUP_FALLBACK:
            data["group_exit_source"] = "signal_live"
        return new_occurrence(
            CONTAINER_ABNORMAL_EXIT,
            "error" if sig else "warning",
            "failure",
            timestamp_ns=when,
            code="ABNORMAL_EXIT",
            message=f"Abnormal exit pid={pid} (code={exit_code}, signal={sig})",
            data=data,
        )
