// SPDX-License-Identifier: GPL-2.0
/*
 * Node observer: run-queue latency measured on sched_switch and aggregated in the kernel.
 *
 * The scheduler already stamps when a task was queued: sched_info.last_queued (CONFIG_SCHED_INFO,
 * on wherever /proc/<pid>/schedstat exists; it does not need schedstats enabled) is set from the
 * run-queue clock when a task is enqueued by a wakeup and when it is switched out while still
 * runnable (preempted), and cleared when it is dequeued. __schedule() updates rq->clock before
 * picking the next task, so at the sched_switch tracepoint "rq->clock - next->last_queued" is the
 * wait that is ending, in the clock the kernel itself uses for run_delay. One hook, no per-task
 * map, no timestamp call on the hot path. Needs CONFIG_SCHED_INFO and CONFIG_FAIR_GROUP_SCHED
 * (both on in every distribution kernel); without them nothing is measured.
 *
 * CFS-bandwidth throttling keeps a task "queued" while its cgroup has no quota left; such a wait
 * is throttling (its own signal, read from cpu.stat), not run-queue latency. A task switched out
 * runnable while throttled (task-based throttling of 6.18+, or a throttled cfs_rq hierarchy before)
 * gets the rq clock stamped in task-local storage; a wait of at least RUNQ_LONG_NS that
 * contains such a stamp is counted as throttled. Short waits (the ping-pong case) never touch the
 * task storage nor the worst slot.
 *
 * Each wait goes into per-CPU counters and a log2 histogram (struct runq_hist); the longest wait
 * per CPU is kept with its task (struct runq_worst). Nothing is sent per event: userspace reads
 * the maps once per interval (bpf/node.h).
 *
 * Run-queue sampling is opt-in: the object is always loaded, but the agent attaches this hook
 * only while the configuration asks for run-queue latency (and detaches it when a new config
 * turns it off), so a default node pays nothing per context switch. CPU stalls are still
 * detected from PSI and cpu.stat without it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "tapio_common.h"
#include "node.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct runq_hist);
} runq_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct runq_worst);
} runq_worst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} runq_throttled SEC(".maps");

/* Kernels before 5.14 call task_struct::__state "state". */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

/* Kernels with task-based CFS throttling (6.18+) mark the throttled task itself. */
struct task_struct___throttle {
	bool throttled;
} __attribute__((preserve_access_index));

static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return t->__state;
	return ((struct task_struct___pre514 *)t)->state;
}

/* Switched out because its cgroup hierarchy ran out of CFS quota (v1 or v2). */
static __always_inline int task_throttled(struct task_struct *t)
{
	struct task_struct___throttle *tt = (void *)t;
	if (bpf_core_field_exists(tt->throttled) && BPF_CORE_READ(tt, throttled))
		return 1;
	struct cfs_rq *cfs = BPF_CORE_READ(t, se.cfs_rq);
	return cfs && BPF_CORE_READ(cfs, throttle_count) > 0;
}

static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 r = 0, shift;
	v >>= 10; /* ~microseconds */
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3;   v >>= shift; r |= shift;
	shift = (v > 0xF) << 2;    v >>= shift; r |= shift;
	shift = (v > 0x3) << 1;    v >>= shift; r |= shift;
	r |= (v >> 1);
	return r < RUNQ_SLOTS ? r : RUNQ_SLOTS - 1;
}

/*
 * The body of both sched_switch programs. ``split_throttle`` is a compile-time constant: the
 * basic variant (kernels without task-local storage, < 5.11) has no task storage call and no
 * reference to runq_throttled, so throttled waits count as run-queue waits there.
 *
 * The program runs on every context switch, so the common case is kept short: one inlined
 * array lookup (the carrier), the queued stamp, the rq clock, one per-CPU histogram update.
 * Only a wait of at least RUNQ_LONG_NS (which a sub-millisecond ping-pong never has) touches
 * the task storage and the per-CPU worst slot; a switch to a task that was not waiting (the
 * idle task, a task that just forked) returns before the run queue is even reached, unless the
 * task being switched out is runnable and must be checked for a quota throttle.
 */
static __always_inline int runq_switch(bool preempt, struct task_struct *prev,
				       struct task_struct *next, const int split_throttle)
{
	__u32 zero = 0;

	/* The config gate of the hot path: three fields, no copy of the 256-byte carrier. */
	struct tapio_config *cfg = bpf_map_lookup_elem(&tapio_config, &zero);
	if (!cfg)
		return 0;
	__u32 abi = cfg->abi_version;
	if (abi != TAPIO_CONFIG_ABI_VERSION) {
		if (abi != 0)
			tapio_metric_inc(TAPIO_METRIC_ABI_MISMATCH);
		return 0;
	}
	__u64 threshold = cfg->runq_latency_threshold_ns;
	if (!(cfg->flags & TAPIO_FLAG_NODE) || !threshold)
		return 0;

	if (!bpf_core_field_exists(next->sched_info.last_queued))
		return 0; /* kernel without CONFIG_SCHED_INFO: nothing to measure */
	__u64 queued = next->sched_info.last_queued;
	/* Only a task switched out runnable can be leaving because of a quota throttle. */
	int mark_prev = split_throttle && (preempt || task_state(prev) == 0);
	if (!queued && !mark_prev)
		return 0; /* the idle task, or a task that was not waiting: nothing to do */
	/*
	 * This CPU's run queue, reached through the task being picked (set_task_rq() points every
	 * task's se.cfs_rq at a cfs_rq of its CPU): "runqueues" is not in kallsyms without
	 * CONFIG_KALLSYMS_ALL, so no __ksym. Plain BTF loads, no helper calls.
	 */
	if (!bpf_core_field_exists(next->se.cfs_rq))
		return 0; /* no CONFIG_FAIR_GROUP_SCHED */
	struct cfs_rq *cfs = next->se.cfs_rq;
	if (!cfs)
		return 0;
	struct rq *rq = cfs->rq;
	if (!rq)
		return 0;
	__u64 now = rq->clock;

	/* Switched out runnable because of a quota throttle: remember when. */
	if (mark_prev && task_throttled(prev)) {
		__u64 *mark = bpf_task_storage_get(&runq_throttled, prev, 0,
						   BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (mark)
			*mark = now;
	}

	if (!queued)
		return 0;
	if (now < queued) {
		tapio_metric_inc(NODE_METRIC_CLOCK_SKEW);
		return 0;
	}
	__u64 delta = now - queued;

	struct runq_hist *h = bpf_map_lookup_elem(&runq_hist, &zero);
	if (!h)
		return 0;
	if (delta < RUNQ_LONG_NS) {
		/* The common case: a short wait, counted and done; it can be neither over the
		 * threshold (>= 1 ms) nor a throttle, and it is never the interval's worst. */
		h->waits += 1;
		h->wait_ns += delta;
		__u64 short_slot = log2_slot(delta);
		barrier_var(short_slot);
		h->slots[short_slot & 15] += 1; /* < RUNQ_LONG_NS: slot <= 9 */
		return 0;
	}
	if (split_throttle) {
		__u64 *mark = bpf_task_storage_get(&runq_throttled, next, 0, 0);
		if (mark && *mark >= queued && *mark <= now) {
			*mark = 0;
			h->throttled_waits += 1;
			h->throttled_ns += delta;
			return 0;
		}
	}
	h->waits += 1;
	h->wait_ns += delta;
	/* A 64-bit index checked right where it is used: older verifiers (6.1) lose a bound
	 * clang proves on a copy of the register. */
	__u64 slot = log2_slot(delta);
	barrier_var(slot);
	if (slot < RUNQ_SLOTS)
		h->slots[slot] += 1;
	if (delta >= threshold)
		h->over += 1;

	struct runq_worst *w = bpf_map_lookup_elem(&runq_worst, &zero);
	if (w && delta > w->max_ns) {
		w->max_ns = delta;
		w->timestamp_ns = bpf_ktime_get_ns();
		w->pid = next->tgid;
		w->tid = next->pid;
		w->config_generation = cfg->generation;
		w->cgroup_id = BPF_CORE_READ(next, cgroups, dfl_cgrp, kn, id);
		bpf_probe_read_kernel(w->comm, sizeof(w->comm), next->comm);
	}
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(node_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return runq_switch(preempt, prev, next, 1);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(node_switch_basic, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return runq_switch(preempt, prev, next, 0);
}
