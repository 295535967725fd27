"""tapio_lost_events_total names why a record was lost: the ring was full (slot 0) or the kernel
refused the reserve twice with room in the ring (slot 2), read by the runtime's metrics poll."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tapio.agent.pipeline import RunningObserver
from tapio.agent.runtime import Agent, AgentOptions
from tapio.agent.settings import AgentSettings
from tapio.bpf.abi import LOST_REASONS, METRIC_LOST, METRIC_LOST_REFUSED
from tapio.metrics import REGISTRY
from tapio.observers.base import ObserverContext
from tapio.observers.network import NetworkObserver
from tapio.sinks.stdout import StdoutSink


def lost(reason: str) -> float:
    sample = {"observer": "network", "reason": reason}
    return REGISTRY.get_sample_value("tapio_lost_events_total", sample) or 0.0


def test_lost_records_are_counted_by_reason() -> None:
    slots = {METRIC_LOST: 4, METRIC_LOST_REFUSED: 1}
    tapio_metrics = SimpleNamespace(percpu_u64_sum=lambda index: slots.get(index, 0))
    obj = SimpleNamespace(map={"tapio_metrics": tapio_metrics}.__getitem__)
    agent = Agent(AgentSettings(), AgentOptions(ebpf_dir=Path("."), observers=[]), [StdoutSink()])
    network = NetworkObserver(ObserverContext(boot_offset_ns=0))
    agent.observers = [RunningObserver(network, obj, None)]  # type: ignore[arg-type]

    assert LOST_REASONS == {0: "ring_full", 2: "reserve_refused"}
    start = lost("ring_full"), lost("reserve_refused")
    agent.poll_kernel_metrics()
    slots[METRIC_LOST_REFUSED] = 3  # the poll adds deltas: 2 more refusals, no more full ring
    agent.poll_kernel_metrics()
    assert (lost("ring_full") - start[0], lost("reserve_refused") - start[1]) == (4, 3)
