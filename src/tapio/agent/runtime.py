"""The agent's lifetime in three named steps: ``startup()``, ``serve()``, ``shutdown()``.

``startup`` checks the host, loads and attaches every observer (writing its ``tapio_config``
carrier) and wires the sinks' lanes; ``serve`` runs the data path and the services as one task
group; ``shutdown``, on SIGTERM/SIGINT, stops draining (after one final pass over the rings),
lets every sink flush within ``shutdown_grace_secs`` and detaches. Everything opened is closed
on every exit path: BPF objects and rings through one ExitStack, tasks through task groups.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tapio.agent.pipeline import (
    LANE_SPILL_PER_BATCH,
    PipelineStats,
    RunningObserver,
    SinkLane,
    classify_loop,
    count_anomalies,
    drainer_for,
    enricher_for,
    fanout_loop,
)
from tapio.agent.settings import AgentSettings
from tapio.bpf.abi import LOST_REASONS, METRIC_ABI_MISMATCH, TapioConfig
from tapio.bpf.libbpf import BpfError, release_heap
from tapio.bpf.ringbuf import Drainer, RingBuffer
from tapio.metrics import (
    CONFIG_ABI_MISMATCH,
    CONFIG_GENERATION,
    CORRELATION_DROPS,
    KERNEL_DROPS,
    LOST_EVENTS,
    OBSERVER_CAPABILITY,
    OBSERVER_UP,
)
from tapio.observers import observer_class
from tapio.observers.base import ObserverContext
from tapio.occurrence import Occurrence
from tapio.sinks.base import Batch, Sink
from tapio.status import AgentStatus, ObserverStatus, write_status
from tapio.thresholds import Thresholds

log = structlog.get_logger("tapio.agent")

STATUS_INTERVAL_SECS = 5.0
#: capability -> the anomaly type the observer cannot produce without it
CAPABILITY_GATES = {"pmu": "kernel.node.ipc_degradation"}


def boot_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC (bpf_ktime_get_ns), once at start."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class AgentOptions:
    ebpf_dir: Path
    observers: Sequence[str]
    node_name: str = "unknown-node"
    #: Standalone: the config written at start. None: carriers stay all-zero (inert) until
    #: ``apply_config`` is called (controller mode).
    initial_config: TapioConfig | None = None
    #: Directory for the local status file read by ``tapio health`` (the file sink's dir).
    status_dir: Path | None = None
    user_thresholds: Thresholds = field(default_factory=Thresholds)
    extra_services: list[Callable[[Agent], object]] = field(default_factory=list)
    #: Checks the host before anything is loaded; raises ``PreflightError`` with the reason.
    preflight: Callable[[], object] | None = None


class Agent:
    def __init__(
        self, settings: AgentSettings, options: AgentOptions, sinks: Sequence[Sink]
    ) -> None:
        if not sinks:
            raise ValueError("at least one sink is required")
        self.settings = settings
        self.options = options
        self.sinks = list(sinks)
        self.observers: list[RunningObserver] = []
        self.applied: TapioConfig | None = None
        self.user_thresholds = options.user_thresholds
        self.ctx = ObserverContext(boot_offset_ns=boot_offset_ns(), node_name=options.node_name)
        self._stopping = False
        self._started = False
        self._detached = False
        #: Owned here and handed to the pipeline stages that count into it.
        self.stats = PipelineStats()
        self._stack = contextlib.ExitStack()
        # Made in serve(): anyio's scopes and events belong to a running event loop.
        self._services_scope: anyio.CancelScope | None = None
        self._pipeline_scope: anyio.CancelScope | None = None
        self._flushed: anyio.Event | None = None
        self._drainer: Drainer | None = None
        self._batches: (
            tuple[MemoryObjectSendStream[Batch], MemoryObjectReceiveStream[Batch]] | None
        ) = None
        self._lanes: list[tuple[SinkLane, MemoryObjectReceiveStream[Batch]]] = []

    # ---- loading -------------------------------------------------------------------------
    def load_observers(self, stack: contextlib.ExitStack) -> None:
        for name in self.options.observers:
            cls = observer_class(name)
            observer = cls(self.ctx)
            path = self.options.ebpf_dir / f"{cls.object_name}.bpf.o"
            ro = RunningObserver(observer, None, None)
            try:
                kib = self.settings.agent.ring_kib.get(name)
                sizes = {cls.ring_map: kib * 1024} if kib and cls.ring_map else None
                obj = stack.enter_context(observer.open_object(path, sizes))
                ro.obj = obj
                initial = self.options.initial_config
                obj.map("tapio_config").update(
                    bytes(4), initial.pack() if initial is not None else bytes(256)
                )
                if cls.ring_map is not None:
                    events = obj.map(cls.ring_map)
                    ro.ring = RingBuffer.open(events.fd, events.max_entries)
                    stack.callback(ro.ring.close)
                observer.on_config(
                    initial if initial is not None else TapioConfig(abi_version=0),
                    self.user_thresholds,
                )
                stack.callback(observer.close)
                observer.attach(obj)
                observer.note_programs(obj)
            except (BpfError, OSError, ValueError) as exc:
                ro.state = "failed"
                ro.error = str(exc)
                log.error(f"{name} observer failed", error=str(exc))
                verifier = getattr(exc, "verifier_log", "")
                if verifier:
                    log.error("verifier log (tail)", observer=name, log=verifier[-4000:])
                OBSERVER_UP.labels(observer=name).set(0)
            else:
                OBSERVER_UP.labels(observer=name).set(1)
                # Exported from the start (at 0), so "nothing lost" is visible, not absent.
                for reason in LOST_REASONS.values():
                    LOST_EVENTS.labels(observer=name, reason=reason)
                CONFIG_ABI_MISMATCH.labels(observer=name)
                for cap in observer.capabilities():
                    OBSERVER_CAPABILITY.labels(observer=name, capability=cap.name).set(
                        1 if cap.available else 0
                    )
                    if not cap.available:
                        (log.info if cap.off else log.warning)(
                            "capability off by configuration"
                            if cap.off
                            else "capability unavailable",
                            observer=name,
                            capability=cap.name,
                            detail=cap.detail,
                        )
                log.info(f"{name} observer running", program_ids=obj.program_ids())
            self.observers.append(ro)
        if self.options.initial_config is not None:
            self.applied = self.options.initial_config
            CONFIG_GENERATION.set(self.applied.generation)

    def apply_config(self, cfg: TapioConfig, user: Thresholds | None = None) -> list[str]:
        """Write ``cfg`` into every carrier, one syscall each; returns the observers that failed."""
        value = cfg.pack()
        if user is not None:
            self.user_thresholds = user
        failed = []
        for ro in self.observers:
            if ro.obj is None:
                continue
            ro.observer.on_config(cfg, self.user_thresholds)
            try:
                ro.obj.map("tapio_config").update(bytes(4), value)
            except BpfError as exc:
                failed.append(ro.name)
                log.error("config write failed", observer=ro.name, error=str(exc))
        self.applied = cfg
        CONFIG_GENERATION.set(cfg.generation)
        return failed

    def program_ids(self) -> dict[str, int]:
        ids: dict[str, int] = {}
        for ro in self.observers:
            if ro.obj is not None:
                for prog, pid in ro.obj.program_ids().items():
                    ids[f"{ro.name}/{prog}"] = pid
        return ids

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when started, not stopping, and at least one observer is attached."""
        reasons = {
            ro.name: ro.state if not ro.error else f"{ro.state}: {ro.error}"
            for ro in self.observers
        }
        if self._stopping:
            reasons["agent"] = "stopping"
        elif not self._started:
            reasons["agent"] = "starting"
        ok = (
            self._started
            and not self._stopping
            and any(ro.state == "running" for ro in self.observers)
        )
        return ok, reasons

    def status(self) -> AgentStatus:
        observers = {}
        for ro in self.observers:
            caps = {c.name: c for c in ro.observer.capabilities()} if ro.state == "running" else {}
            unsupported = {
                anomaly: caps[cap].detail or f"{cap} unavailable"
                for cap, anomaly in CAPABILITY_GATES.items()
                if cap in caps and not caps[cap].available
            }
            for cap in caps.values():
                if not cap.available:
                    for anomaly in cap.anomalies:
                        unsupported.setdefault(anomaly, cap.detail or f"{cap.name} unavailable")
            observers[ro.name] = ObserverStatus(
                state=ro.state,
                error=ro.error,
                degraded_reasons=list(ro.observer.degraded_reasons),
                capabilities={name: c.available for name, c in caps.items()},
                unsupported=unsupported,
            )
        return AgentStatus(
            written_at_unix=time.time(),
            pid=os.getpid(),
            node_name=self.options.node_name,
            config_generation=self.applied.generation if self.applied else 0,
            observers=observers,
        )

    async def _status_loop(self, directory: Path) -> None:
        while True:
            try:
                await anyio.to_thread.run_sync(write_status, directory, self.status())
            except OSError as exc:
                log.warning("status file not written", error=str(exc))
            await anyio.sleep(STATUS_INTERVAL_SECS)

    # ---- kernel metrics -------------------------------------------------------------------
    def poll_kernel_metrics(self) -> None:
        for ro in self.observers:
            if ro.obj is None:
                continue
            try:
                mmap_ = ro.obj.map("tapio_metrics")
                indices = [*LOST_REASONS, METRIC_ABI_MISMATCH, *ro.observer.kernel_metrics]
                for idx in indices:
                    value = mmap_.percpu_u64_sum(idx)
                    delta = value - ro.kernel_counts.get(idx, 0)
                    if delta <= 0:
                        continue
                    ro.kernel_counts[idx] = value
                    if idx in LOST_REASONS:
                        reason = LOST_REASONS[idx]
                        LOST_EVENTS.labels(observer=ro.name, reason=reason).inc(delta)
                        log.warning(
                            "ring buffer events lost", observer=ro.name, lost=delta, reason=reason
                        )
                    elif idx == METRIC_ABI_MISMATCH:
                        CONFIG_ABI_MISMATCH.labels(observer=ro.name).inc(delta)
                        if "abi_mismatch" not in ro.observer.degraded_reasons:
                            ro.observer.degraded_reasons.append("abi_mismatch")
                        log.error("tapio_config ABI mismatch", observer=ro.name, count=delta)
                    else:
                        kind, reason = ro.observer.kernel_metrics[idx]
                        if kind == "correlation_drop":
                            CORRELATION_DROPS.labels(observer=ro.name, reason=reason).inc(delta)
                        else:
                            KERNEL_DROPS.labels(observer=ro.name, reason=reason).inc(delta)
            except BpfError as exc:
                log.warning("kernel metrics read failed", observer=ro.name, error=str(exc))

    async def _kernel_metrics_loop(self) -> None:
        interval = self.settings.agent.kernel_metrics_interval_secs
        while True:
            self.poll_kernel_metrics()
            await anyio.sleep(interval)

    # ---- lifetime: startup, serve, shutdown ------------------------------------------------
    async def run(self) -> int:
        """The whole life: ``startup()``, then ``serve()`` until a signal, then ``shutdown()``.

        Returns the exit status: 1 when the host cannot run the agent or no observer started,
        0 after a signal (whether or not every sink finished within the grace period).
        """
        try:
            if not await self.startup():
                return 1
            # Everything imported and loaded so far lives for the whole run: move it out of the
            # collector's sight and collect the young generation less often. Occurrences are
            # gc=False structs; their short-lived data dicts would otherwise trigger a gen-0
            # pass every 700 allocations.
            gc.freeze()
            gc.set_threshold(50_000, 20, 50)
            release_heap()  # what loading the objects left free in the C heap
            await self.serve()
        finally:
            self.detach()
        return 0

    async def startup(self) -> bool:
        """Preflight, load and attach every observer, and wire the sinks' lanes.

        Raises :class:`PreflightError` when the host cannot run eBPF at all; returns False when
        no observer could start, or one could not and ``[agent] allow_degraded`` is off (each
        failure already logged with its reason).
        """
        if self.options.preflight is not None:
            self.options.preflight()
        self.load_observers(self._stack)
        running = [ro for ro in self.observers if ro.state == "running"]
        failed = {ro.name: ro.error for ro in self.observers if ro.state == "failed"}
        if not running:
            log.error("no observer could start; exiting", failed=failed)
            return False
        if failed and not self.settings.agent.allow_degraded:
            log.error(
                "observer could not start; exiting (run without it: --allow-missing-observer"
                " or [agent] allow_degraded = true)",
                failed=failed,
            )
            return False
        a = self.settings.agent
        self._drainer = drainer_for(running, a.drain_interval_ms / 1000, a.max_drain_per_tick)
        self._batches = anyio.create_memory_object_stream[Batch](a.channel_batches)
        for sink in self.sinks:
            # One batch waiting in the stream; what arrives while the sink is busy is joined in
            # the lane's spill (bounded in occurrences) and handed over as one larger batch.
            send, recv = anyio.create_memory_object_stream[Batch](1)
            lane = SinkLane(sink, send, spill_limit=a.channel_batches * LANE_SPILL_PER_BATCH)
            self._lanes.append((lane, recv))
        return True

    async def serve(self) -> None:
        """Run the data path (drain → classify → fan-out → sinks) and the services, until a
        signal makes the watcher call :meth:`shutdown` and the pipeline has flushed."""
        assert self._drainer is not None and self._batches is not None
        a = self.settings.agent
        batch_send, batch_recv = self._batches
        running = [ro for ro in self.observers if ro.state == "running"]
        payload_sends: dict[str, MemoryObjectSendStream[bytes]] = {}
        self._flushed = flushed = anyio.Event()
        self._services_scope = anyio.CancelScope()
        self._pipeline_scope = pipeline_scope = anyio.CancelScope()
        async with anyio.create_task_group() as outer:
            # Started, not just scheduled: SIGTERM and SIGINT are handled before "agent started"
            # is logged, so a stop that follows that line at once still flushes and exits 0.
            await outer.start(self._watch_signals)
            with pipeline_scope:
                async with anyio.create_task_group() as tg:
                    for lane, recv in self._lanes:
                        tg.start_soon(lane.sink.run, recv)
                    lanes = [lane for lane, _ in self._lanes]
                    tg.start_soon(fanout_loop, batch_recv, lanes, enricher_for(running))
                    for ro in running:
                        if ro.ring is None:
                            continue
                        ps, pr = anyio.create_memory_object_stream[bytes](a.channel_batches)
                        payload_sends[ro.name] = ps
                        tg.start_soon(classify_loop, ro, pr, batch_send.clone(), self.stats)
                    tg.start_soon(self._services, batch_send.clone())
                    batch_send.close()
                    tg.start_soon(self._drainer.run, payload_sends)
                    self._started = True
                    log.info(
                        "agent started",
                        observers=[ro.name for ro in running],
                        sinks=[s.name for s in self.sinks],
                        config_generation=self.applied.generation if self.applied else 0,
                    )
            flushed.set()
            if not self._stopping:  # the pipeline ended on its own: nothing left to wait for
                outer.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Stop draining (after one last pass over the rings), let every sink flush what it
        holds within ``shutdown_grace_secs``, then detach from the kernel.

        The drainer's end closes the channels stage by stage, so each sink sees its stream end
        only after everything before it was delivered to it. A sink still busy when the grace
        period ends is cancelled (its undelivered occurrences are lost, and the log says so).
        """
        self.request_stop()
        flushed, pipeline_scope = self._flushed, self._pipeline_scope
        assert flushed is not None and pipeline_scope is not None, "shutdown() runs in serve()"
        grace = self.settings.agent.shutdown_grace_secs
        with anyio.move_on_after(grace):
            await flushed.wait()
        if not flushed.is_set():
            log.warning(
                "shutdown grace period exceeded; exiting without waiting for sinks", grace=grace
            )
            pipeline_scope.cancel()
            with anyio.CancelScope(shield=True):
                await flushed.wait()
        self.detach()

    def detach(self) -> None:
        """Read the kernel counters one last time, close every BPF object and ring (idempotent)."""
        if self._detached:
            return
        self._detached = True
        if any(ro.obj is not None for ro in self.observers):
            self.poll_kernel_metrics()
        self._stack.close()
        if self._started:
            log.info(
                "agent stopped",
                events=self._drainer.records if self._drainer is not None else 0,
                anomalies=self.stats.anomalies,
                sinks={
                    s.name: {
                        "ok": s.stats.ok_total,
                        "err": s.stats.err_total,
                        "dropped": s.stats.dropped_total,
                    }
                    for s in self.sinks
                },
            )

    def request_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._services_scope is not None:
            self._services_scope.cancel()
        if self._drainer is not None:
            self._drainer.scope.cancel()

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name)
                break
        await self.shutdown()

    async def _services(self, emit_send: anyio.abc.ObjectSendStream[Batch]) -> None:
        async def emit_for(name: str, batch: Sequence[Occurrence]) -> None:
            if batch:
                count_anomalies(name, batch, self.stats)
                await emit_send.send(list(batch))

        assert self._services_scope is not None
        async with emit_send:
            with self._services_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._kernel_metrics_loop)
                    if self.options.status_dir is not None:
                        tg.start_soon(self._status_loop, self.options.status_dir)
                    for ro in self.observers:
                        if ro.state == "running":
                            name = ro.name

                            async def emit(batch: Sequence[Occurrence], _n: str = name) -> None:
                                await emit_for(_n, batch)

                            tg.start_soon(ro.observer.run, emit)
                    for service in self.options.extra_services:
                        tg.start_soon(service, self)  # type: ignore[arg-type]
