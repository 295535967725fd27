/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * What every Tapio BPF object shares: the config carrier, the per-CPU metrics map, the config
 * gate and the batched-wakeup submit. Include after vmlinux.h and the libbpf headers.
 */
#ifndef TAPIO_COMMON_H
#define TAPIO_COMMON_H

#include "tapio_config.h"

/* tapio_metrics indices: 0..7 are common, 8.. belong to the observer (see its header). */
#define TAPIO_METRIC_LOST          0 /* ring buffer reserve failed: the ring was full */
#define TAPIO_METRIC_ABI_MISMATCH  1 /* tapio_config present but abi_version wrong */
#define TAPIO_METRIC_LOST_REFUSED  2 /* reserve failed twice although the ring showed room */
#define TAPIO_METRIC_OBSERVER_BASE 8
#define TAPIO_METRIC_MAX           32

/*
 * Force a consumer wakeup when 1 / 2^TAPIO_WAKEUP_SHIFT of the ring is pending (128 KiB of the
 * network ring's 2 MiB); below it the agent's drain timer picks records up. A fraction, not a
 * fixed size, so that a ring resized at load ([agent] ring_kib) keeps its headroom after the
 * wakeup. A default-flags submit costs ~6 us of irq_work per event (docs/architecture.md).
 */
#define TAPIO_WAKEUP_SHIFT 4

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tapio_config);
} tapio_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TAPIO_METRIC_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tapio_metrics SEC(".maps");

/*
 * The agent's wake flag (one per object, mapped into the agent): non-zero while the agent is
 * parked, that is asleep without a drain timer after a quiet spell. See tapio_submit_sized.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
} tapio_wake SEC(".maps");

static __always_inline void tapio_metric_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&tapio_metrics, &idx);
	if (v)
		*v += 1;
}

/*
 * Copy the config to *out and return 1 when this observer may run: the carrier exists, the ABI
 * matches and the observer's flag is set. An all-zero carrier (never configured) is silent and
 * uncounted; a non-zero wrong abi_version is counted as an ABI mismatch.
 */
static __always_inline int tapio_config_gate(struct tapio_config *out, __u64 flag)
{
	__u32 zero = 0;
	struct tapio_config *cfg = bpf_map_lookup_elem(&tapio_config, &zero);
	if (!cfg)
		return 0;
	__builtin_memcpy(out, cfg, sizeof(*out));
	if (out->abi_version != TAPIO_CONFIG_ABI_VERSION) {
		if (out->abi_version != 0)
			tapio_metric_inc(TAPIO_METRIC_ABI_MISMATCH);
		return 0;
	}
	return (out->flags & flag) != 0;
}

/*
 * The same gate for the hot paths (every TCP state change, every block request, every exit):
 * returns 1 when this observer may run and points *out at the carrier itself (use it only then),
 * without copying its 256 bytes to the stack. The caller reads each field it needs once into a
 * local, so one decision still sees one value per field. (An int and an out pointer rather than
 * a returned pointer: clang turns "flag ? cfg : NULL" into a mask on the pointer, which the
 * verifier rejects.)
 */
static __always_inline int tapio_config_on(const struct tapio_config **out, __u64 flag)
{
	__u32 zero = 0;
	const struct tapio_config *cfg = bpf_map_lookup_elem(&tapio_config, &zero);
	*out = cfg;
	if (cfg && cfg->abi_version == TAPIO_CONFIG_ABI_VERSION)
		return (cfg->flags & flag) != 0;
	if (cfg && cfg->abi_version != 0)
		tapio_metric_inc(TAPIO_METRIC_ABI_MISMATCH);
	return 0;
}

/* What a record of `size` bytes takes in a ring: the record plus the ring's 8-byte header,
 * rounded up to 8 bytes (the kernel's own accounting). */
static __always_inline __u64 tapio_ring_footprint(__u64 size)
{
	return (size + 8 + 7) & ~7ULL;
}

/*
 * Submit without a wakeup; force one only for the record that makes the pending data cross the
 * wakeup threshold. Forcing on every record above the threshold would turn a slow consumer into
 * an irq_work storm (~6 us per event) exactly when the node is busiest. While the agent is
 * parked (tapio_wake set) the kernel's own rule applies instead (flags 0): wake the consumer iff
 * it has caught up with this record, i.e. the ring was empty, so the first record after a quiet
 * spell wakes the agent and the records behind it, still unread, do not; the agent clears the
 * flag as soon as it wakes.
 */
static __always_inline void tapio_submit_sized(void *ringbuf, void *rec, __u64 size)
{
	__u64 avail = bpf_ringbuf_query(ringbuf, BPF_RB_AVAIL_DATA);
	__u64 wake = bpf_ringbuf_query(ringbuf, BPF_RB_RING_SIZE) >> TAPIO_WAKEUP_SHIFT;
	__u64 total = tapio_ring_footprint(size);
	__u64 flags = BPF_RB_NO_WAKEUP;
	__u32 zero = 0;
	__u32 *parked;

	if (avail >= wake && avail < wake + total)
		flags = BPF_RB_FORCE_WAKEUP;
	else if ((parked = bpf_map_lookup_elem(&tapio_wake, &zero)) && *parked)
		flags = 0;
	bpf_ringbuf_submit(rec, flags);
}

#define tapio_submit(ringbuf, rec) tapio_submit_sized(ringbuf, rec, sizeof(*(rec)))

/*
 * The slow path of TAPIO_RESERVE, after a failed reserve of `size` bytes. A refusal does not
 * always mean "full": the kernel judges the room from the consumer position as it read it, and
 * newer kernels also refuse when they cannot take the ring's lock in time. If the ring shows room
 * for the record now, try once more. A loss is then
 * counted by why: the ring was full (TAPIO_METRIC_LOST), or it refused twice with room shown
 * (TAPIO_METRIC_LOST_REFUSED), so the agent can tell a consumer too slow from anything else.
 */
static __always_inline void *tapio_reserve_retry(void *ringbuf, __u64 size)
{
	__u64 avail = bpf_ringbuf_query(ringbuf, BPF_RB_AVAIL_DATA);
	__u64 ring = bpf_ringbuf_query(ringbuf, BPF_RB_RING_SIZE);
	__u64 total = tapio_ring_footprint(size);
	void *r;

	if (avail + total >= ring) {
		tapio_metric_inc(TAPIO_METRIC_LOST);
		return 0;
	}
	r = bpf_ringbuf_reserve(ringbuf, size, 0);
	if (!r)
		tapio_metric_inc(TAPIO_METRIC_LOST_REFUSED);
	return r;
}

/* Reserve a zeroed record or count the loss (one retry when the ring has room, see above). */
#define TAPIO_RESERVE(ringbuf, type)                                            \
	({                                                                      \
		type *__r = bpf_ringbuf_reserve(ringbuf, sizeof(type), 0);      \
		if (!__r)                                                       \
			__r = tapio_reserve_retry(ringbuf, sizeof(type));       \
		if (__r)                                                        \
			__builtin_memset(__r, 0, sizeof(type));                 \
		__r;                                                            \
	})

#endif /* TAPIO_COMMON_H */
