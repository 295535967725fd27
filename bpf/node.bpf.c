// SPDX-License-Identifier: GPL-2.0
/*
 * Node observer: run-queue latency measured on the scheduler tracepoints and aggregated in the
 * kernel. A task becomes runnable at sched_wakeup/sched_wakeup_new, or when it is switched out
 * while still runnable (preempted); the wait ends when sched_switch picks it. Each wait goes into
 * per-CPU counters and a log2 histogram (struct runq_hist) and the longest wait per CPU is kept
 * with its task (struct runq_worst). No record per event ever leaves the kernel: userspace reads
 * the maps once per interval (bpf/node.h).
 *
 * Hot-path rules: tp_btf programs (no tracepoint-buffer copy), one config lookup without copying
 * the carrier, task-local storage instead of a hash map keyed by pid, per-CPU aggregates only.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "tapio_common.h"
#include "node.h"

char LICENSE[] SEC("license") = "GPL";

#define TASK_RUNNING 0

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct runq_start);
} runq_start SEC(".maps");

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

/* Kernels before 5.14 call task_struct::__state "state". */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

/* Kernels with task-based CFS throttling (6.18+) mark the throttled task itself. */
struct task_struct___throttle {
	bool throttled;
} __attribute__((preserve_access_index));

/*
 * The config gate of the hot path: no copy of the 256-byte carrier, only the three fields this
 * object needs. Returns the run-queue threshold, 0 when the observer must stay silent.
 */
static __always_inline __u64 node_gate(__u32 *generation)
{
	__u32 zero = 0;
	struct tapio_config *cfg = bpf_map_lookup_elem(&tapio_config, &zero);
	if (!cfg)
		return 0;
	__u32 abi = cfg->abi_version;
	if (abi != TAPIO_CONFIG_ABI_VERSION) {
		if (abi != 0)
			tapio_metric_inc(TAPIO_METRIC_ABI_MISMATCH);
		return 0;
	}
	if (!(cfg->flags & TAPIO_FLAG_NODE))
		return 0;
	*generation = cfg->generation;
	return cfg->runq_latency_threshold_ns;
}

static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)t, state);
}

/* Switched out because its cgroup hierarchy ran out of CFS quota (v1 or v2). */
static __always_inline __u32 task_throttled(struct task_struct *t)
{
	struct task_struct___throttle *tt = (void *)t;
	if (bpf_core_field_exists(tt->throttled) && BPF_CORE_READ(tt, throttled))
		return 1;
	if (bpf_core_field_exists(t->se.cfs_rq)) {
		struct cfs_rq *cfs = BPF_CORE_READ(t, se.cfs_rq);
		if (cfs && BPF_CORE_READ(cfs, throttle_count) > 0)
			return 1;
	}
	return 0;
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

static __always_inline void mark_runnable(struct task_struct *p, __u64 now, __u32 throttled)
{
	struct runq_start *s =
		bpf_task_storage_get(&runq_start, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!s) {
		tapio_metric_inc(NODE_METRIC_STORAGE_FULL);
		return;
	}
	s->ts = now;
	s->throttled = throttled;
}

static __always_inline int on_wakeup(struct task_struct *p)
{
	__u32 gen;
	if (!node_gate(&gen))
		return 0;
	if (!p->pid)
		return 0;
	mark_runnable(p, bpf_ktime_get_ns(), 0);
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(node_wakeup, struct task_struct *p)
{
	return on_wakeup(p);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(node_wakeup_new, struct task_struct *p)
{
	return on_wakeup(p);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(node_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u32 gen = 0, zero = 0;
	__u64 threshold = node_gate(&gen);
	if (!threshold)
		return 0;
	__u64 now = bpf_ktime_get_ns();

	/* Switched out while still runnable: it waits on a run queue from now on. */
	if (prev->pid && (preempt || task_state(prev) == TASK_RUNNING))
		mark_runnable(prev, now, task_throttled(prev));

	if (!next->pid)
		return 0; /* the idle task */
	struct runq_start *s = bpf_task_storage_get(&runq_start, next, 0, 0);
	if (!s || !s->ts)
		return 0;
	__u64 delta = now - s->ts;
	__u32 throttled = s->throttled;
	s->ts = 0;
	if ((__s64)delta < 0)
		return 0;

	struct runq_hist *h = bpf_map_lookup_elem(&runq_hist, &zero);
	if (!h)
		return 0;
	if (throttled) {
		h->throttled_waits += 1;
		h->throttled_ns += delta;
		return 0;
	}
	h->waits += 1;
	h->wait_ns += delta;
	__u32 slot = log2_slot(delta);
	if (slot < RUNQ_SLOTS)
		h->slots[slot] += 1;
	if (delta >= threshold)
		h->over += 1;

	struct runq_worst *w = bpf_map_lookup_elem(&runq_worst, &zero);
	if (w && delta > w->max_ns) {
		w->max_ns = delta;
		w->timestamp_ns = now;
		w->pid = next->tgid;
		w->tid = next->pid;
		w->config_generation = gen;
		w->cgroup_id = BPF_CORE_READ(next, cgroups, dfl_cgrp, kn, id);
		bpf_probe_read_kernel(w->comm, sizeof(w->comm), next->comm);
	}
	return 0;
}
