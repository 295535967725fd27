"""What every observer provides to the agent's pipeline.

An observer owns one BPF object (``<object_name>.bpf.o``) with an ``events`` ring buffer of one
fixed-size record type. The agent drains the ring in batches and hands the observer a payload of
back-to-back records; ``classify`` turns them into occurrences. Observers that also watch
non-BPF kernel facts (PSI, cgroup files) implement ``run``, which emits through the same path.

An observer is parse + classify only: it reports what the kernel said (cgroup ids, pids, paths
it watched). What the node's cgroup files say about those cgroups (path, container, pod) is
added afterwards by the one enrichment stage (:class:`tapio.agent.pipeline.Enricher`), as
each observer declares in ``enrichment``. A record userspace drops is counted where it is
dropped (:meth:`Observer.drop`, ``tapio_observer_drops_total{observer,reason}``).
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import Counter

from tapio.bpf.abi import CStruct, TapioConfig
from tapio.bpf.features import ProgramSpec
from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import BpfObject
from tapio.metrics import OBSERVER_DROPS
from tapio.occurrence import Occurrence
from tapio.thresholds import Thresholds

if TYPE_CHECKING:
    from tapio.bpf.ringbuf import RingBuffer
    from tapio.observers.cgroups import Enrichment

Emit = Callable[[Sequence[Occurrence]], Awaitable[None]]


class CStrings:
    """Decodes NUL-padded kernel strings (``comm``, disk names) through a bounded memo.

    The same few dozen comms arrive millions of times; a dict hit is several times cheaper than
    split + decode. The memo is cleared wholesale when full: simpler and cheaper than an LRU for
    a working set that is almost always far below the bound. ``cache`` is public so a hot loop
    can bind ``cache.get`` once and call ``decode`` only on a miss.
    """

    __slots__ = ("cache", "maxsize")

    def __init__(self, maxsize: int = 4096) -> None:
        self.cache: dict[bytes, str] = {}
        self.maxsize = maxsize

    def decode(self, raw: bytes) -> str:
        text = self.cache.get(raw)
        if text is None:
            if len(self.cache) >= self.maxsize:
                self.cache.clear()
            try:
                text = raw.split(b"\0", 1)[0].decode("utf-8")
            except UnicodeDecodeError:
                text = "<invalid>"
            self.cache[raw] = text
        return text


@dataclass
class ObserverContext:
    """Process-wide facts an observer may need; never a back-reference into the pipeline."""

    boot_offset_ns: int  # wall clock minus CLOCK_MONOTONIC, computed once at start
    node_name: str = "unknown-node"
    settings: dict[str, object] = field(default_factory=dict)


#: The thresholds the observers judge with in userspace; the agent's one thresholds type,
#: built from the TOML (standalone) or the controller's compiled profile, pushed with
#: ``on_config``.
UserThresholds = Thresholds


@dataclass
class Capability:
    name: str
    available: bool
    detail: str = ""
    #: anomaly types this observer cannot produce while the capability is unavailable
    anomalies: tuple[str, ...] = ()
    #: unavailable only because the configuration leaves it off (an opt-in feature): reported
    #: like any capability (metric 0, status), logged at info level, never a degradation
    off: bool = False


class Observer(abc.ABC):
    name: ClassVar[str]
    object_name: ClassVar[str]
    record: ClassVar[CStruct]
    #: The ring buffer map drained by the agent; None for an observer that only aggregates in
    #: kernel maps and reports from ``run``.
    ring_map: ClassVar[str | None] = "events"
    # Observer-specific tapio_metrics indices → (metric kind, reason); kind is "kernel_drop" or
    # "correlation_drop".
    kernel_metrics: ClassVar[dict[int, tuple[str, str]]] = {}
    #: The object's optional programs and the anomaly types each serves: a kernel that cannot
    #: load or attach one turns off only those anomaly types (``program_capabilities``).
    programs: ClassVar[tuple[ProgramSpec, ...]] = ()
    #: Anomaly type → what the enrichment stage adds to it (nothing when absent).
    enrichment: ClassVar[dict[str, Enrichment]] = {}

    def __init__(self, ctx: ObserverContext) -> None:
        self.ctx = ctx
        #: The observer's kernel strings (comm, disk names), decoded through one bounded memo.
        self.strings = CStrings()
        self.degraded_reasons: list[str] = []
        self._program_caps: list[Capability] = []
        self._drops: dict[str, Counter] = {}

    def open_object(self, path: Path, map_sizes: Mapping[str, int] | None = None) -> BpfObject:
        """The observer's object, loaded with its optional programs declared (``programs``) and
        the maps named in ``map_sizes`` resized (entries; bytes for a ring buffer)."""
        return BpfObject(path, programs=self.programs, map_sizes=map_sizes)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records dropped for ``reason`` (``tapio_observer_drops_total``)."""
        counter = self._drops.get(reason)
        if counter is None:
            counter = self._drops[reason] = OBSERVER_DROPS.labels(observer=self.name, reason=reason)
        counter.inc(n)

    def attach(self, obj: BpfObject) -> None:
        """Attach the object's programs (default: all of them, by section name)."""
        obj.attach_all()

    def note_programs(self, obj: BpfObject) -> None:
        """After ``attach``: one capability per declared program capability, unavailable (with
        the kernel's reason, and ``no_<capability>`` in ``degraded_reasons``) when none of its
        programs runs. Raises BpfError when no declared program runs at all: then the observer
        has nothing to observe and must fail, not look healthy."""
        unavailable = obj.unavailable()
        caps: dict[str, Capability] = {}
        for spec in self.programs:
            cap = caps.setdefault(
                spec.capability,
                Capability(
                    spec.capability,
                    spec.capability not in unavailable,
                    unavailable.get(spec.capability, ""),
                ),
            )
            cap.anomalies = tuple(sorted({*cap.anomalies, *spec.anomalies}))
        self._program_caps = list(caps.values())
        for cap in self._program_caps:
            reason = f"no_{cap.name}"
            if not cap.available and reason not in self.degraded_reasons:
                self.degraded_reasons.append(reason)
        if self.programs and not obj.attached:
            raise BpfError(
                errno.ENOTSUP,
                f"no program of {obj.path.name} runs on this kernel",
                "; ".join(f"{c.name}: {c.detail}" for c in self._program_caps if c.detail),
            )

    def capabilities(self) -> list[Capability]:
        """What the kernel offers this observer; subclasses add their own to these."""
        return list(self._program_caps)

    def on_config(self, kernel: TapioConfig, user: UserThresholds) -> None:  # noqa: B027
        """A (new) config was written to the carrier; userspace thresholds come with it.

        Called once at start (before ``run``) and on every controller config change; an
        all-zero kernel config (controller mode, not yet configured) means: emit nothing.
        """

    def classify(self, payload: bytes | bytearray) -> list[Occurrence]:
        """Decode ring frames (``record.iter_frames``: header length, then the record's fields)
        and return the anomalies among them."""
        boot = self.ctx.boot_offset_ns
        one = self.classify_one
        return [
            occ
            for frame in self.record.iter_frames(payload)
            if (occ := one(frame, boot)) is not None
        ]

    def classify_one(self, frame: tuple[Any, ...], boot_offset_ns: int) -> Occurrence | None:
        """One ring frame → its occurrence, or None when it is dropped (and counted)."""
        raise NotImplementedError(f"{type(self).__name__} has no ring records to classify")

    def side_rings(self) -> Sequence[tuple[RingBuffer, Callable[[], None]]]:
        """Rings this observer drains itself (in ``run``), each with the callback the drainer
        calls when it finds records pending there: the observer then needs no timer of its own
        to notice them (they wake a parked agent like the main ring does)."""
        return ()

    async def run(self, emit: Emit) -> None:  # noqa: B027 - optional hook
        """Long-running side task for non-BPF facts; returns when there is nothing to do."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``attach`` or ``run`` opened beyond the BPF object."""
