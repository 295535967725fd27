"""The node observer as a package: one module per concern.

* :mod:`.observer` — :class:`NodeObserver`: lifecycle, loops, reading the kernel's maps;
* :mod:`.runq` — the run-queue aggregates' ABI (bpf/node.h) and arithmetic;
* :mod:`.throttle` — CFS bandwidth (``cpu.stat``) parsing and deltas;
* :mod:`.psi` — PSI files and triggers; :mod:`.board` — hysteresis and the PSI source tree;
* :mod:`.pmu` — hardware counters through ``perf_event_open``;
* :mod:`.discovery` — which cgroups are watched; :mod:`.judges` — the occurrences.
"""

from tapio.observers.node.observer import NodeObserver
from tapio.observers.node.runq import RUNQ_HIST, RUNQ_SLOTS, RUNQ_WORST

__all__ = ["RUNQ_HIST", "RUNQ_SLOTS", "RUNQ_WORST", "NodeObserver"]
