"""Evidence window memory under 1,000,000 forwarded occurrences: it stays within its bound.

Occurrences are shaped the way the controller makes them: a wire batch from an agent, enriched
with pod, namespace and workload names, encoded by ``build_records``. That batch is the
template; each of the 1,000,000 occurrences is a copy with its own id, timestamp, pod and
namespace, each of those strings and the document its own object (as decoding each agent batch
makes them: the worst case for memory). They go through an
:class:`~tapio.controller.evidence.EvidenceWindow` in batches of 256, and the memory the window
holds is measured with ``tracemalloc`` after every 50,000 occurrences (the batch being built is
released first, so what is measured is what the window keeps). Two runs:

* the default bounds (50,000 occurrences, 1 h, 64 MiB) with typical documents, where the count
  bound is the one that holds;
* a 16 MiB byte bound with 2 KiB documents, where the byte bound holds;
* the same with the records as ingest makes them when no output forwards them
  (``ingest_records``: each keeps its event's JSON instead of an encoded document).

Prints, per run, the bound, the window's own accounting and the measured peak, and exits 1 if
the measured memory ever exceeded the bound. Usage::

    .venv/bin/python benchmarks/evidence_window.py [--occurrences 1000000]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from dataclasses import dataclass

import msgspec

from tapio import wire
from tapio.controller.evidence import DEFAULT_MAX_BYTES, EvidenceWindow
from tapio.controller.forward import Record, build_records, ingest_records
from tapio.controller.forward.record import held_bytes

BATCH = 256
CHECK_EVERY = 50_000
T0 = 1_800_000_000_000_000_000


@dataclass
class Result:
    name: str
    bound: int
    accounted_peak: int
    measured_peak: int
    events: int
    seconds: float


def make_batch(start: int, pad: int) -> wire.EventBatchRequest:
    events = []
    for i in range(start, start + 1):
        facts = {
            "occurrence_id": f"01BENCH{i:019d}",
            "dst_addr": f"10.{i % 250}.{(i // 250) % 250}.7",
            "dst_port": 1024 + i % 60000,
            "pid": 1000 + i % 30000,
            "comm": "java",
            "container_id": f"{i % 5000:064x}",
            "pod_uid": f"{i % 5000:08x}-1111-2222-3333-444444444444",
            "pod_name": f"checkout-7d9f8b6c4-{i % 5000:05d}",
            "pod_namespace": f"team-{i % 40}",
            "container_name": "app",
            "workload_kind": "Deployment",
            "workload_name": f"checkout-{i % 200}",
            "node_name": f"node-{i % 300}",
        }
        if pad:
            facts["cmdline"] = "x" * pad
        events.append(
            wire.WireEvent(
                type="kernel.network.connection_refused",
                timestamp_unix_nanos=T0 + i,
                observer="network",
                severity=wire.EventSeverity.WARNING,
                facts=facts,
            )
        )
    return wire.EventBatchRequest(
        wire_version=wire.WIRE_VERSION,
        agent_id=f"agent-{start % 300}",
        node_name=f"node-{start % 300}",
        sequence=1,
        sent_at_unix_nanos=T0,
        events=events,
    )


def copies(template: Record, start: int) -> list[Record]:
    """``BATCH`` occurrences like ``template``, each with its own id, time, pod and namespace."""
    tid = template.id.encode()
    out = []
    for i in range(start, start + BATCH):
        oid = f"01BENCH{i:019d}"
        copy = msgspec.structs.replace(
            template,
            id=oid,
            body=template.body.replace(tid, oid.encode()),
            event=template.event.replace(tid, oid.encode()),
            ts_ns=T0 + i,
            node_name=f"node-{i % 300}",
            namespace=f"team-{i % 40}",
            pod=f"checkout-7d9f8b6c4-{i % 5000:05d}",
            workload_name=f"checkout-{i % 200}",
        )
        if copy.held:  # what ingest computes with the batch's columns, for this copy
            copy.held = held_bytes(copy)
        out.append(copy)
    return out


def run(name: str, occurrences: int, pad: int, lazy: bool = False, **bounds: int) -> Result:
    batch = make_batch(0, pad)
    if lazy:
        body = msgspec.json.encode(batch)
        (template,) = ingest_records(wire.decode(body, wire.EventBatchRequest), body)
    else:
        (template,) = build_records(batch)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    window = EvidenceWindow(**bounds)  # type: ignore[arg-type]
    accounted = measured = 0
    started = time.perf_counter()
    for start in range(0, occurrences, BATCH):
        records = copies(template, start)
        window.add(records)
        del records
        if (start + BATCH) % CHECK_EVERY < BATCH:
            gc.collect()
            measured = max(measured, tracemalloc.get_traced_memory()[0] - base)
            accounted = max(accounted, window.bytes)
    seconds = time.perf_counter() - started
    gc.collect()
    measured = max(measured, tracemalloc.get_traced_memory()[0] - base)
    tracemalloc.stop()
    return Result(name, window.max_bytes, accounted, measured, len(window), seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--occurrences", type=int, default=1_000_000)
    args = p.parse_args()
    results = [
        run("default bounds, typical documents", args.occurrences, 0),
        run(
            "16 MiB byte bound, 2 KiB documents",
            args.occurrences,
            2048,
            max_bytes=16 * 1024 * 1024,
            max_events=1_000_000,
        ),
        run(
            "16 MiB byte bound, 2 KiB events, documents not yet encoded",
            args.occurrences,
            2048,
            lazy=True,
            max_bytes=16 * 1024 * 1024,
            max_events=1_000_000,
        ),
    ]
    ok = True
    print(f"{args.occurrences:,} occurrences pushed through each window (tracemalloc)")
    for r in results:
        within = r.measured_peak <= r.bound
        ok = ok and within
        print(
            f"{r.name}: bound {r.bound / 2**20:.1f} MiB, accounted peak "
            f"{r.accounted_peak / 2**20:.1f} MiB, measured peak {r.measured_peak / 2**20:.1f} MiB "
            f"({r.measured_peak / r.bound:.0%} of the bound), {r.events:,} held at the end, "
            f"{args.occurrences / r.seconds:,.0f} occurrences/s with tracing "
            f"-> {'within' if within else 'OVER'} the bound"
        )
    assert results[0].bound == DEFAULT_MAX_BYTES
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
