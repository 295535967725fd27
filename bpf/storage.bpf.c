// SPDX-License-Identifier: GPL-2.0
/*
 * Storage observer: block request errors and slow requests, correlated from
 * block/block_rq_issue to block/block_rq_complete.
 *
 * The issuer (pid, tid, comm, cgroups) is captured at issue time: completions run in softirq or
 * in a driver's worker, whose current task has nothing to do with the request.
 *
 * Correlation key: (dev, sector, nr_sector, op). A second issue for a key still inflight marks
 * the entry ambiguous; its completion is then dropped and counted (STORAGE_METRIC_AMBIGUOUS),
 * because we cannot tell which issuer (or issue time) it belongs to. A completion with no issue
 * record (evicted from the LRU, issued before attach or while disabled, partial completion with
 * a different size) is counted as STORAGE_METRIC_UNMATCHED. Wrong evidence is never emitted.
 *
 * Only reads and writes are tracked; discards, secure erases, pure flushes ("F", "FF") and other
 * operations ("N") are ignored by design. A flush-prefixed write ("FW...") is a write.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "tapio_common.h"
#include "tapio_cgroup.h"
#include "storage.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 512 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct io_key);
	__type(value, struct io_value);
} inflight SEC(".maps");

/* STORAGE_OP_* from the rwbs string, or -1 for requests we do not track. */
static __always_inline int rwbs_op(const char *rwbs)
{
	char c0 = rwbs[0], c1 = rwbs[1];
	if (c0 == 'F') /* preflush: look at the operation that follows */
		c0 = c1;
	if (c0 == 'R')
		return STORAGE_OP_READ;
	if (c0 == 'W')
		return STORAGE_OP_WRITE;
	return -1;
}

/* The inflight key of a request, shared by issue, requeue and completion; 0 when untracked. */
static __always_inline int io_key_of(struct io_key *k, __u32 dev, __u64 sector, __u32 nr_sector,
				     const char *rwbs)
{
	int op = rwbs_op(rwbs);
	if (op < 0)
		return 0;
	__builtin_memset(k, 0, sizeof(*k));
	k->dev = dev;
	k->nr_sector = nr_sector;
	k->sector = sector;
	k->opcode = op;
	return 1;
}

SEC("tracepoint/block/block_rq_issue")
int handle_rq_issue(struct trace_event_raw_block_rq *ctx)
{
	/* Scalars and arrays out of ctx first (no loads through an offset ctx pointer). */
	__u32 dev = ctx->dev;
	__u64 sector = ctx->sector;
	__u32 nr_sector = ctx->nr_sector;
	__u32 bytes = ctx->bytes;
	char rwbs[8] = {};
	bpf_probe_read_kernel(rwbs, sizeof(rwbs), ctx->rwbs);

	struct io_key key;
	if (!io_key_of(&key, dev, sector, nr_sector, rwbs))
		return 0;
	const struct tapio_config *cfg;
	if (!tapio_config_on(&cfg, TAPIO_FLAG_STORAGE))
		return 0;

	struct io_value *old = bpf_map_lookup_elem(&inflight, &key);
	if (old) {
		if (old->requeued) {
			/* The same request dispatched again after block_rq_requeue: keep the original
			 * issue time and issuer, it is not a second request. */
			old->requeued = 0;
			return 0;
		}
		old->ambiguous = 1; /* keep the first issue; its completion will be dropped */
		return 0;
	}
	struct io_value val = {};
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	val.issue_ns = bpf_ktime_get_ns();
	val.cgroup_id = bpf_get_current_cgroup_id();
	val.memcg_id = tapio_current_memcg_id();
	val.pid = pid_tgid >> 32;
	val.tid = (__u32)pid_tgid;
	val.bytes = bytes ? bytes : nr_sector * 512;
	bpf_get_current_comm(val.comm, sizeof(val.comm));
	__builtin_memcpy(val.rwbs, rwbs, sizeof(val.rwbs));
	if (bpf_map_update_elem(&inflight, &key, &val, BPF_NOEXIST) != 0) {
		/* Raced with another issue of the same key on another CPU. */
		old = bpf_map_lookup_elem(&inflight, &key);
		if (old)
			old->ambiguous = 1;
	}
	return 0;
}

/*
 * A driver may hand a request back (queue busy, virtio ring full) and dispatch it again later:
 * block_rq_requeue, then a second block_rq_issue with the same key. Without this mark the
 * re-issue would look like a second request and the completion would be dropped as ambiguous.
 */
SEC("tracepoint/block/block_rq_requeue")
int handle_rq_requeue(struct trace_event_raw_block_rq_requeue *ctx)
{
	__u32 dev = ctx->dev;
	__u64 sector = ctx->sector;
	__u32 nr_sector = ctx->nr_sector;
	char rwbs[8] = {};
	bpf_probe_read_kernel(rwbs, sizeof(rwbs), ctx->rwbs);
	struct io_key key;
	if (!io_key_of(&key, dev, sector, nr_sector, rwbs))
		return 0;
	struct io_value *v = bpf_map_lookup_elem(&inflight, &key);
	if (v)
		v->requeued = 1;
	return 0;
}

/* Not inlined on purpose: its signature puts struct storage_event into the object's BTF. */
static __noinline int fill_event(struct storage_event *e, const struct io_value *v,
				 const struct io_key *k)
{
	e->cgroup_id = v->cgroup_id;
	e->memcg_id = v->memcg_id;
	e->pid = v->pid;
	e->tid = v->tid;
	e->bytes = v->bytes;
	__builtin_memcpy(e->comm, v->comm, sizeof(e->comm));
	__builtin_memcpy(e->rwbs, v->rwbs, sizeof(e->rwbs));
	e->sector = k->sector;
	e->nr_sector = k->nr_sector;
	e->dev_major = k->dev >> 20;
	e->dev_minor = k->dev & 0xfffff;
	e->opcode = k->opcode;
	return 0;
}

/*
 * Before 5.11 block_rq_complete had a record type of its own (trace_event_raw_block_rq_complete);
 * since then it shares block_rq_completion with block_rq_error. The fields are the same, so
 * the program reads whichever type the running kernel has (resolved by libbpf at load; the
 * branch for the other type is dead code the verifier never walks).
 */
struct trace_event_raw_block_rq_complete___pre511 {
	dev_t dev;
	sector_t sector;
	unsigned int nr_sector;
	int error;
	char rwbs[8];
} __attribute__((preserve_access_index));

SEC("tracepoint/block/block_rq_complete")
int handle_rq_complete(struct trace_event_raw_block_rq_completion *ctx)
{
	__u32 dev, nr_sector;
	__u64 sector;
	__s32 error;
	char rwbs[8] = {};
	if (bpf_core_type_exists(struct trace_event_raw_block_rq_completion)) {
		dev = ctx->dev;
		sector = ctx->sector;
		nr_sector = ctx->nr_sector;
		error = ctx->error;
		bpf_probe_read_kernel(rwbs, sizeof(rwbs), ctx->rwbs);
	} else {
		/* Through probe reads: the verifier refuses loads through a ctx pointer clang may
		 * have offset when it merges the two branches. */
		struct trace_event_raw_block_rq_complete___pre511 *old = (void *)ctx;
		dev = BPF_CORE_READ(old, dev);
		sector = BPF_CORE_READ(old, sector);
		nr_sector = BPF_CORE_READ(old, nr_sector);
		error = BPF_CORE_READ(old, error);
		bpf_probe_read_kernel(rwbs, sizeof(rwbs), old->rwbs);
	}

	struct io_key key;
	if (!io_key_of(&key, dev, sector, nr_sector, rwbs))
		return 0;

	const struct tapio_config *cfg;
	int enabled = tapio_config_on(&cfg, TAPIO_FLAG_STORAGE);
	struct io_value *v = bpf_map_lookup_elem(&inflight, &key);
	if (!v) {
		if (enabled)
			tapio_metric_inc(STORAGE_METRIC_UNMATCHED);
		return 0;
	}
	/* The config gates emission, not cleanup. */
	if (!enabled) {
		bpf_map_delete_elem(&inflight, &key);
		return 0;
	}
	if (v->ambiguous) {
		tapio_metric_inc(STORAGE_METRIC_AMBIGUOUS);
		bpf_map_delete_elem(&inflight, &key);
		return 0;
	}

	__u64 now = bpf_ktime_get_ns();
	__u64 latency = now - v->issue_ns;
	__u64 critical_ns = cfg->io_latency_critical_ns, slow_ns = cfg->slow_io_threshold_ns;
	__u32 generation = cfg->generation;
	__u8 severity;
	if (error != 0)
		severity = STORAGE_SEV_CRITICAL;
	else if (critical_ns && latency >= critical_ns)
		severity = STORAGE_SEV_CRITICAL;
	else if (slow_ns && latency >= slow_ns)
		severity = STORAGE_SEV_WARNING;
	else {
		bpf_map_delete_elem(&inflight, &key);
		return 0;
	}

	struct storage_event *e = TAPIO_RESERVE(&events, struct storage_event);
	if (e) {
		e->timestamp_ns = now;
		e->latency_ns = latency;
		e->config_generation = generation;
		e->error_code = error;
		e->severity = severity;
		fill_event(e, v, &key);
		tapio_submit(&events, e);
	}
	bpf_map_delete_elem(&inflight, &key);
	return 0;
}
