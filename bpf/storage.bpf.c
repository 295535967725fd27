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
 * record (evicted, issued before attach or while disabled, partial completion with
 * a different size) is counted as STORAGE_METRIC_UNMATCHED. Wrong evidence is never emitted.
 *
 * Only reads and writes are tracked; discards, secure erases, pure flushes ("F", "FF") and other
 * operations ("N") are ignored by design. A flush-prefixed write ("FW...") is a write.
 *
 * Each hook has alternatives, one program group each (the agent loads the first its kernel
 * accepts). Two maps: the slot table (the *_slot programs, tp_btf, 5.12+: an array taken and
 * handed on with BPF atomics, see below) and the inflight LRU hash (the other programs). The
 * slot programs are loaded all together or not at all, so issue and completion always share a
 * map. tp_btf programs read struct request directly; classic tracepoints read the record the
 * kernel formats, which costs the read path about as much again as the program itself before the
 * program runs (the kernel fills the whole record: rwbs, comm and a command string, in a per-CPU
 * perf buffer). The tp_btf issue program is the slot table's (BPF atomics and
 * bpf_get_current_task_btf(): 5.12+); below that the classic issue program serves, with the LRU
 * tp_btf completion (block_rq_complete has had (rq, error, nr_bytes) on every supported kernel). Every build produces the same key, the same rwbs bytes
 * and the same error code as the kernel's record. The LRU path's requeue program is classic:
 * it runs only when a driver hands a request back, so it costs nothing on the common path.
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

/* The inflight key of a request (op: STORAGE_OP_*), shared by issue, requeue and completion. */
static __always_inline void io_key_of(struct io_key *k, __u32 dev, __u64 sector, __u32 nr_sector,
				      int op)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->dev = dev;
	k->nr_sector = nr_sector;
	k->sector = sector;
	k->opcode = op;
}

/*
 * What the kernel's record holds, computed from struct request (tp_btf programs). The request's
 * operation is the low 8 bits of cmd_flags on every supported kernel; READ (0) and WRITE (1)
 * never changed value. The flag bits are enumerators of enum req_flag_bits, relocated at load.
 */
#define TAPIO_REQ_OP_MASK 0xff
#define TAPIO_REQ_OP_READ 0
#define TAPIO_REQ_OP_WRITE 1
#define REQ_BIT(name) (1u << bpf_core_enum_value(enum req_flag_bits, name))

/* Up to 5.17 WRITE_SAME (7) was reported as a write ("W"); later kernels have no such op. */
enum req_opf___pre518 { REQ_OP_WRITE_SAME___pre518 = 7 };

/*
 * The few fields of struct request and its disk the programs read, as local types relocated
 * against the running kernel (naming the kernel's own struct request would pull its whole type
 * graph into this object's BTF). Before 5.19 the tracepoints named the request's disk
 * rq->rq_disk (later rq->q->disk); before 5.11 the whole-disk partition was embedded in the
 * gendisk (struct hd_struct), its device holding devt.
 */
struct block_device___tapio {
	dev_t bd_dev;
} __attribute__((preserve_access_index));
struct gendisk___tapio {
	struct block_device___tapio *part0;
} __attribute__((preserve_access_index));
struct request_queue___tapio {
	struct gendisk___tapio *disk;
} __attribute__((preserve_access_index));
struct request___tapio {
	struct request_queue___tapio *q;
	struct gendisk___tapio *rq_disk;
	unsigned int cmd_flags;
	unsigned int __data_len;
	sector_t __sector;
} __attribute__((preserve_access_index));
struct device___tapio {
	dev_t devt;
} __attribute__((preserve_access_index));
struct hd_struct___pre511 {
	struct device___tapio __dev;
} __attribute__((preserve_access_index));
struct gendisk___pre511 {
	struct hd_struct___pre511 part0;
} __attribute__((preserve_access_index));

/* The tracepoints' dev: disk_devt() of the request's disk, 0 without one. */
static __always_inline __u32 rq_dev(struct request___tapio *rq)
{
	struct gendisk___tapio *disk;
	if (bpf_core_field_exists(rq->rq_disk))
		disk = rq->rq_disk;
	else
		disk = rq->q->disk;
	if (!disk)
		return 0;
	if (bpf_core_type_exists(struct hd_struct___pre511))
		return ((struct gendisk___pre511 *)disk)->part0.__dev.devt;
	return disk->part0->bd_dev;
}

/*
 * blk_fill_rwbs() for the two tracked operations, byte for byte: "F" for a preflush, the
 * operation, then F(ua), A (readahead), S(ync), M(eta) and, where the kernel has atomic writes,
 * U; NUL-padded to 8 bytes. Returns STORAGE_OP_* or -1 for an untracked operation (rwbs unset).
 */
static __always_inline int rq_rwbs(char rwbs[8], __u32 opf)
{
	__u32 op = opf & TAPIO_REQ_OP_MASK;
	int code;
	char c;
	if (op == TAPIO_REQ_OP_READ) {
		code = STORAGE_OP_READ;
		c = 'R';
	} else if (op == TAPIO_REQ_OP_WRITE ||
		   (bpf_core_enum_value_exists(enum req_opf___pre518, REQ_OP_WRITE_SAME___pre518) &&
		    op == bpf_core_enum_value(enum req_opf___pre518, REQ_OP_WRITE_SAME___pre518))) {
		code = STORAGE_OP_WRITE;
		c = 'W';
	} else {
		return -1;
	}
	__u64 out = 0; /* built in a register, stored once */
	int i = 0;
	if (opf & REQ_BIT(__REQ_PREFLUSH))
		out |= (__u64)'F' << (8 * i++);
	out |= (__u64)c << (8 * i++);
	if (opf & REQ_BIT(__REQ_FUA))
		out |= (__u64)'F' << (8 * i++);
	if (opf & REQ_BIT(__REQ_RAHEAD))
		out |= (__u64)'A' << (8 * i++);
	if (opf & REQ_BIT(__REQ_SYNC))
		out |= (__u64)'S' << (8 * i++);
	if (opf & REQ_BIT(__REQ_META))
		out |= (__u64)'M' << (8 * i++);
	if (bpf_core_enum_value_exists(enum req_flag_bits, __REQ_ATOMIC) &&
	    (opf & REQ_BIT(__REQ_ATOMIC)))
		out |= (__u64)'U' << (8 * i++);
	__builtin_memcpy(rwbs, &out, 8);
	return code;
}

/*
 * blk_status_to_errno(): block_rq_complete reports the errno. Kernels that pass a blk_status_t
 * (a u8; the BLK_STS_* values are macros, fixed and only ever appended to) get it converted here;
 * older kernels pass the errno itself, zero or negative, so a positive argument is a status.
 */
/*
 * errno (positive) by BLK_STS_* value, as the kernel's blk_errors table has it: OK, EOPNOTSUPP,
 * ETIMEDOUT, ENOSPC, ENOLINK (transport), EREMOTEIO (target), EBADE (nexus / reservation
 * conflict), ENODATA (medium), EILSEQ (protection), ENOMEM (resource), EIO, EREMCHG (dm requeue),
 * EAGAIN, EBUSY (device resource), ETOOMANYREFS (zone resource, open zones), EOVERFLOW (active
 * zones), ENODEV (offline), ETIME (duration limit), EINVAL.
 */
static const __u8 blk_sts_errno[] = {
	0, 95, 110, 28, 67, 121, 52, 61, 84, 12, 5, 78, 11, 16, 109, 109, 75, 19, 62, 22,
};

static __always_inline __s32 rq_errno(__u64 arg)
{
	__u32 u = (__u32)arg;
	if ((__s32)u <= 0)
		return (__s32)u;
	if (u >= sizeof(blk_sts_errno))
		return -5; /* beyond the kernel's table: EIO, as the kernel does */
	return -(__s32)blk_sts_errno[u];
}

/*
 * Issue: the issuer and the time, under the request's key. Inserting first and looking only when
 * the key is already there spares the common case (no such key inflight) a lookup.
 */
static __always_inline int rq_issue(__u32 dev, __u64 sector, __u32 nr_sector, __u32 bytes,
				    const char *rwbs, int op)
{
	if (op < 0)
		return 0;
	const struct tapio_config *cfg;
	if (!tapio_config_on(&cfg, TAPIO_FLAG_STORAGE))
		return 0;
	struct io_key key;
	io_key_of(&key, dev, sector, nr_sector, op);

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
	if (bpf_map_update_elem(&inflight, &key, &val, BPF_NOEXIST) == 0)
		return 0;
	/* The key is inflight already (or another CPU inserted it just now). */
	struct io_value *old = bpf_map_lookup_elem(&inflight, &key);
	if (!old)
		return 0;
	if (old->requeued) {
		/* The same request dispatched again after block_rq_requeue: keep the original issue
		 * time and issuer, it is not a second request. */
		old->requeued = 0;
		return 0;
	}
	old->ambiguous = 1; /* keep the first issue; its completion will be dropped */
	return 0;
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
	return rq_issue(dev, sector, nr_sector, bytes, rwbs, rwbs_op(rwbs));
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
	int op = rwbs_op(rwbs);
	if (op < 0)
		return 0;
	struct io_key key;
	io_key_of(&key, dev, sector, nr_sector, op);
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

/* A matched completion: report it when it failed or crossed a threshold (both maps). */
static __always_inline void io_report(const struct tapio_config *cfg, const struct io_value *v,
				      const struct io_key *k, __s32 error)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 latency = now - v->issue_ns;
	__u64 critical_ns = cfg->io_latency_critical_ns, slow_ns = cfg->slow_io_threshold_ns;
	__u8 severity;
	if (error != 0)
		severity = STORAGE_SEV_CRITICAL;
	else if (critical_ns && latency >= critical_ns)
		severity = STORAGE_SEV_CRITICAL;
	else if (slow_ns && latency >= slow_ns)
		severity = STORAGE_SEV_WARNING;
	else
		return;
	struct storage_event *e = TAPIO_RESERVE(&events, struct storage_event);
	if (!e)
		return;
	e->timestamp_ns = now;
	e->latency_ns = latency;
	e->config_generation = cfg->generation;
	e->error_code = error;
	e->severity = severity;
	fill_event(e, v, k);
	tapio_submit(&events, e);
}

/* Completion: match the issue, decide, report, forget. */
static __always_inline int rq_complete(__u32 dev, __u64 sector, __u32 nr_sector, __s32 error,
				       int op)
{
	if (op < 0)
		return 0;
	struct io_key key;
	io_key_of(&key, dev, sector, nr_sector, op);

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

	io_report(cfg, v, &key, error);
	bpf_map_delete_elem(&inflight, &key);
	return 0;
}

/* ctx: (struct request *rq, error, unsigned int nr_bytes); the error's type varies, see rq_errno. */
SEC("tp_btf/block_rq_complete")
int handle_rq_complete_btf(__u64 *ctx)
{
	struct request___tapio *rq = (void *)ctx[0];
	char rwbs[8];
	int op = rq_rwbs(rwbs, rq->cmd_flags); /* rq_complete returns at once for op < 0 */
	return rq_complete(rq_dev(rq), rq->__sector, (__u32)ctx[2] >> 9, rq_errno(ctx[1]), op);
}

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

	return rq_complete(dev, sector, nr_sector, error, rwbs_op(rwbs));
}

/*
 * The slot table: the same correlation without a hash map, for kernels with BPF atomics (5.12+)
 * and tp_btf issue programs. An LRU hash insert, lookup and delete per request (bucket locks,
 * the LRU's own list lock, a hash of 24 bytes, elements scattered over the map) were most of what
 * the storage programs cost a fast device's read; here a request costs one inlined array lookup
 * and one compare-and-swap to take a slot and one exchange to hand it back, at issue and again
 * at completion, within one set of a few cache lines.
 *
 * A request is held in one of the IO_SLOT_WAYS slots of the set its key hashes to, tagged with
 * the request's address, so a completion finds its own issue by (address, key) and two
 * requests are never confused with each other. Only the program that took a slot (turned its
 * owner word from FREE, or from a request's address, to BUSY by compare-and-swap) writes or
 * reads the slot's key and value, and it publishes or frees the slot with an exchange (a full
 * barrier), so no reader ever sees a half-written issuer. The hash map's outcomes are kept:
 *  - a second issue of a key inflight marks the first ambiguous (its completion is dropped and
 *    counted), unless it is the same request dispatched again after block_rq_requeue;
 *  - a full set gives its oldest slot to the new request, as the LRU evicted its oldest entry;
 *    the evicted request's completion then finds nothing and is counted as unmatched;
 *  - a completion without an issue, or of another size (a partial completion), is unmatched.
 * One thing is new: an entry of the same key older than IO_SLOT_STALE_NS is taken over by the
 * new issue instead of making it ambiguous. Such an entry is one whose completion was never seen
 * (a partial completion, a program run the kernel skipped); left there, it would make every
 * later request of its key ambiguous until its set filled, which a quiet disk may never do.
 */
#define IO_SLOT_STALE_NS (120ULL * 1000000000ULL)
#define IO_SLOT_NONE IO_SLOT_WAYS

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IO_SLOT_SETS);
	__type(key, __u32);
	__type(value, struct io_set);
} io_slots SEC(".maps");

/* The key's set: a multiplicative hash of the key's fields. */
static __always_inline struct io_set *io_set_of(const struct io_key *k)
{
	__u64 h = k->sector ^ ((__u64)k->dev << 32) ^ ((__u64)k->nr_sector << 12) ^ k->opcode;
	__u32 i = (__u32)((h * 0x9E3779B97F4A7C15ULL) >> (64 - IO_SLOT_SETS_LOG2));
	return bpf_map_lookup_elem(&io_slots, &i);
}

/* Keys are built by io_key_of (padding zeroed), so three words compare them whole. */
static __always_inline int io_key_eq(const struct io_key *a, const struct io_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

static __always_inline __u64 io_owner(const struct io_set *set, __u32 w)
{
	return *(volatile const __u64 *)&set->owner[w];
}

/* Take slot w from `seen` (FREE or a request's address) for this program; 1 on success. */
static __always_inline int io_slot_take(struct io_set *set, __u32 w, __u64 seen)
{
	return __sync_val_compare_and_swap(&set->owner[w], seen, IO_SLOT_BUSY) == seen;
}

static __always_inline void io_slot_give(struct io_set *set, __u32 w, __u64 owner)
{
	__sync_lock_test_and_set(&set->owner[w], owner);
}

/* The way of `set` holding request `rq` under `key`, or IO_SLOT_NONE. */
static __always_inline __u32 io_slot_find(const struct io_set *set, __u64 rq,
					  const struct io_key *key)
{
	for (__u32 w = 0; w < IO_SLOT_WAYS; w++)
		if (io_owner(set, w) == rq && io_key_eq(&set->key[w], key))
			return w;
	return IO_SLOT_NONE;
}

/* The request's key and rwbs with `nr_bytes` as its size; STORAGE_OP_* or -1 (key unset). */
static __always_inline int rq_key(struct io_key *key, char rwbs[8], struct request___tapio *rq,
				  __u32 nr_bytes)
{
	int op = rq_rwbs(rwbs, rq->cmd_flags);
	if (op >= 0)
		io_key_of(key, rq_dev(rq), rq->__sector, nr_bytes >> 9, op);
	return op;
}

static __always_inline int rq_issue_slot(__u64 rq, const struct io_key *key, __u32 bytes,
					 const char *rwbs)
{
	const struct tapio_config *cfg;
	if (!tapio_config_on(&cfg, TAPIO_FLAG_STORAGE))
		return 0;
	struct io_set *set = io_set_of(key);
	if (!set)
		return 0;
	__u64 now = bpf_ktime_get_ns();

	/* One pass over the set: the key inflight already, a free way, the oldest way. */
	__u32 mine = IO_SLOT_NONE, oldest = IO_SLOT_NONE;
	__u64 seen = IO_SLOT_FREE, oldest_owner = 0, oldest_ns = ~0ULL;
	for (__u32 w = 0; w < IO_SLOT_WAYS; w++) {
		__u64 o = io_owner(set, w);
		if (o == IO_SLOT_FREE) {
			if (mine == IO_SLOT_NONE)
				mine = w;
			continue;
		}
		if (o == IO_SLOT_BUSY)
			continue;
		__u64 issued = set->val[w].issue_ns;
		if (io_key_eq(&set->key[w], key)) {
			/* Signed: another CPU may have issued it after `now` was read. */
			if ((__s64)(now - issued) >= (__s64)IO_SLOT_STALE_NS) {
				mine = w; /* take the stale entry's place */
				seen = o;
				break;
			}
			if (o == rq && set->val[w].requeued) {
				set->val[w].requeued = 0; /* dispatched again: keep the first issue */
				return 0;
			}
			set->val[w].ambiguous = 1; /* keep the first issue; its completion is dropped */
			return 0;
		}
		if (issued < oldest_ns) {
			oldest = w;
			oldest_owner = o;
			oldest_ns = issued;
		}
	}
	if (mine == IO_SLOT_NONE && oldest != IO_SLOT_NONE) {
		/* The set is full: its oldest entry makes room, as an LRU would evict it. */
		mine = oldest;
		seen = oldest_owner;
	}
	/* Lost to another CPU (or nothing to take): this request goes unrecorded, and its
	 * completion is counted as unmatched. */
	if (mine >= IO_SLOT_WAYS || !io_slot_take(set, mine, seen))
		return 0;

	/* The slot is this program's until it is given to the request. */
	struct io_value *v = &set->val[mine];
	struct task_struct *task = bpf_get_current_task_btf();
	struct css_set *cs = task->cgroups;
	int ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id);
	__u32 id = ok ? bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id) : 0;
	set->key[mine] = *key;
	v->issue_ns = now;
	/* What bpf_get_current_cgroup_id() and bpf_get_current_comm() give, by plain loads. */
	v->cgroup_id = cs ? tapio_cgroup_kn_id(cs->dfl_cgrp) : 0;
	v->memcg_id = tapio_css_set_cgroup_id(cs, ok, id);
	v->pid = task->tgid;
	v->tid = task->pid;
	v->bytes = bytes;
	v->ambiguous = 0;
	v->requeued = 0;
	__builtin_memcpy(v->comm, task->comm, sizeof(v->comm)); /* see tapio_current_comm */
	__builtin_memcpy(v->rwbs, rwbs, sizeof(v->rwbs));
	io_slot_give(set, mine, rq);
	return 0;
}

/* ctx: (struct request *rq). */
SEC("tp_btf/block_rq_issue")
int handle_rq_issue_slot(__u64 *ctx)
{
	struct request___tapio *rq = (void *)ctx[0];
	struct io_key key;
	char rwbs[8];
	__u32 bytes = rq->__data_len;
	if (rq_key(&key, rwbs, rq, bytes) < 0)
		return 0;
	return rq_issue_slot(ctx[0], &key, bytes, rwbs);
}

/* ctx: (struct request *rq) from 5.11 on; the slot programs need 5.12+. */
SEC("tp_btf/block_rq_requeue")
int handle_rq_requeue_slot(__u64 *ctx)
{
	struct request___tapio *rq = (void *)ctx[0];
	struct io_key key;
	char rwbs[8];
	if (rq_key(&key, rwbs, rq, rq->__data_len) < 0)
		return 0;
	struct io_set *set = io_set_of(&key);
	if (!set)
		return 0;
	__u32 w = io_slot_find(set, ctx[0], &key);
	if (w < IO_SLOT_WAYS)
		set->val[w].requeued = 1;
	return 0;
}

/* ctx: (struct request *rq, error, unsigned int nr_bytes), as handle_rq_complete_btf. */
SEC("tp_btf/block_rq_complete")
int handle_rq_complete_slot(__u64 *ctx)
{
	struct request___tapio *rq = (void *)ctx[0];
	struct io_key key;
	char rwbs[8];
	if (rq_key(&key, rwbs, rq, (__u32)ctx[2]) < 0)
		return 0;
	const struct tapio_config *cfg;
	int enabled = tapio_config_on(&cfg, TAPIO_FLAG_STORAGE);
	struct io_set *set = io_set_of(&key);
	if (!set)
		return 0;
	__u64 me = ctx[0];
	__u32 w = io_slot_find(set, me, &key);
	if (w >= IO_SLOT_WAYS || !io_slot_take(set, w, me)) {
		if (enabled)
			tapio_metric_inc(STORAGE_METRIC_UNMATCHED);
		return 0;
	}
	/* The config gates emission, not cleanup. */
	struct io_value *v = &set->val[w];
	if (enabled && cfg) {
		if (v->ambiguous)
			tapio_metric_inc(STORAGE_METRIC_AMBIGUOUS);
		else
			io_report(cfg, v, &set->key[w], rq_errno(ctx[1]));
	}
	io_slot_give(set, w, IO_SLOT_FREE);
	return 0;
}
