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
pure cgroup2 host all three name the same cgroup). ``cgroup_id`` is the id of the cgroup that
describes the process best: for an OOM kill the memory cgroup (whose limit is reported), for an
exit the cgroup2 cgroup, each falling back to the next hierarchy where the task is not in the
root. The raw ids are facts too (``cgroup2_id``, ``memory_cgroup_id``, ``cpu_cgroup_id``). When
the OOM victim was not the task running the tracepoint, its cgroups are read from
``/proc/<pid>/cgroup`` if it still exists (``cgroup_source: "proc"``), else they are unknown
(``cgroup_source: "unknown"``, ``cgroup_path: null``) — never guessed.

Attribution (container id, runtime, pod UID) comes from :mod:`tapio.observers.attribution`; the
cgroup tree is indexed at start and every ``REFRESH_SECS`` so that a container whose cgroup is
removed right after its last process died is still attributed.
"""

from __future__ import annotations

import os
import signal as _signal
from typing import Any, ClassVar

from tapio.bpf.abi import METRIC_OBSERVER_BASE, CStruct
from tapio.bpf.features import ProgramSpec
from tapio.observers.attribution import U64_MAX, CgroupResolver, cgroup_facts, scan_tree
from tapio.observers.base import CStrings, Emit, Observer, ObserverContext
from tapio.occurrence import (
    CONTAINER_ABNORMAL_EXIT,
    CONTAINER_OOM_KILL,
    Occurrence,
    new_occurrence,
)

CONTAINER_EVENT = CStruct(
    "container_event",
    [
        ("timestamp_ns", "Q"),
        ("cgroup_id", "Q"),
        ("memcg_id", "Q"),
        ("cpu_cgroup_id", "Q"),
        ("memory_usage_bytes", "Q"),
        ("memory_limit_pages", "Q"),
        ("total_vm_kb", "Q"),
        ("anon_rss_kb", "Q"),
        ("file_rss_kb", "Q"),
        ("shmem_rss_kb", "Q"),
        ("config_generation", "I"),
        ("pid", "I"),
        ("tid", "I"),
        ("exit_code", "i"),
        ("signal", "i"),
        ("raw_status", "I"),
        ("event_type", "B"),
        ("flags", "B"),
        ("oom_score_adj", "h"),
        ("uid", "I"),
        ("comm", "16s"),
    ],
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

REFRESH_SECS = 10.0
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
        ProgramSpec("handle_process_exit", "process_exit", (CONTAINER_ABNORMAL_EXIT,)),
    )

    def __init__(self, ctx: ObserverContext, resolver: CgroupResolver | None = None) -> None:
        super().__init__(ctx)
        self.resolver = resolver if resolver is not None else CgroupResolver()
        self._comms = CStrings()

    # ---- lifetime --------------------------------------------------------------------------
    def refresh_cgroups(self) -> None:
        """Index every cgroup directory now (bounded by the resolver's cache)."""
        for root in self.resolver.distinct_roots():
            self.resolver.merge(root, scan_tree(root))

    async def run(self, emit: Emit) -> None:
        import anyio

        # The scan runs in a worker thread and touches no shared state; the merge into the
        # resolver's caches happens here, on the event loop that also classifies.
        while True:
            for root in self.resolver.distinct_roots():
                entries = await anyio.to_thread.run_sync(scan_tree, root)
                self.resolver.merge(root, entries)
            await anyio.sleep(REFRESH_SECS)

    # ---- decoding ----------------------------------------------------------------------------

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        out: list[Occurrence] = []
        boot = self.ctx.boot_offset_ns
        for frame in CONTAINER_EVENT.iter_frames(payload):
            occ = self.classify_one(frame, boot)
            if occ is not None:
                out.append(occ)
        return out

    def _cgroups(
        self, pid: int, flags: int, ids: dict[str, int], order: tuple[str, ...]
    ) -> tuple[dict[str, object], str | None]:
        """Cgroup facts and the memory cgroup path (for the limit fallback)."""
        resolver = self.resolver
        paths: dict[str, str | None] = {}
        source = "task"
        if flags & FLAG_TASK_CGROUPS:
            for h, cid in ids.items():
                paths[h] = resolver.path_for_id(h, cid)
        else:
            by_pid = resolver.paths_for_pid(pid)
            if by_pid:
                source = "proc"
                for h in ids:
                    p = by_pid.get(h)
                    paths[h] = p
                    ids[h] = resolver.id_for_path(h, p) if p is not None else 0
            else:
                source = "unknown"
                for h in ids:
                    paths[h] = None
        facts = cgroup_facts(resolver, ids, paths, order)
        facts["cgroup_source"] = source
        return facts, paths.get("memory")

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
            return None
        ids: dict[str, int] = {"unified": cg2, "memory": memcg, "cpu": cpucg}
        order = _OOM_ORDER if ev_type == EV_OOM_KILL else _EXIT_ORDER
        cg_facts, mem_path = self._cgroups(pid, flags, ids, order)
        limit: int | None = None
        if flags & FLAG_LIMIT_VALID:
            limit = limit_bytes_from_pages(limit_pages)
        elif mem_path is not None:
            limit = self.resolver.memory_limit(mem_path)
        data: dict[str, object] = {
            "comm": self._comms.decode(comm),
            "config_generation": generation,
            "memory_limit_bytes": limit,
            "pid": pid,
            "tid": tid,
            "timestamp_ns": ts,
            **cg_facts,
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
                message=(
                    f"OOM kill pid={pid} (usage={usage // _MB if usage_known else 0}MB, "
                    f"limit={(limit or 0) // _MB}MB)"
                ),
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
