// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark-only synthetic producer: one run writes `count` connection-refused records (up to
 * MAX_PER_RUN), in the network observer's layout, into the ring map given at load time (the
 * running agent's own ring, reused by id). It is run with BPF_PROG_TEST_RUN and a repeat count
 * of 1, so the agent's sustained throughput is measured without a connect() loop as the
 * bottleneck. (A repeat count above 1 makes the kernel swap the XDP dispatcher in and out around
 * every test run, which cost milliseconds per call and capped the producer at ~10,000 records/s;
 * a loop inside one run costs ~100 ns per record.) It never ships in the package:
 * benchmarks/bench_throughput.py builds and loads it.
 *
 * The packet handed to the test run carries the pid/tid to report, a port base and the record
 * count; records are submitted with the observers' own tapio_submit (bpf/tapio_common.h), with
 * the agent's network wake flag (its tapio_wake map, reused by id like the ring).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "tapio_common.h"

struct network_event {
	__u64 timestamp_ns;
	__u32 config_generation;
	__u32 pid;
	__u32 tid;
	__u8 event_type;
	__u8 family;
	__u8 pid_source;
	__u8 old_state;
	__u8 new_state;
	__u8 flags;
	__u16 sport;
	__u16 dport;
	__u8 _pad1[2];
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 sk_err;
	__u32 retrans_count;
	__u32 total_retrans;
	__u32 snd_cwnd;
	__u32 rtt_baseline_us;
	__u32 rtt_current_us;
	__u32 rtt_samples;
	__u8 _pad2[4];
	__u64 duration_ns;
	char comm[16];
	__u64 cgroup_id;
	__u64 memcg_id;
	__u64 cpu_cgroup_id;
};

_Static_assert(sizeof(struct network_event) == 144, "network_event layout");

struct params {
	__u32 pid;
	__u32 tid;
	__u32 generation;
	__u16 port_base;
	__u16 dport;
	__u32 count;
};

#define MAX_PER_RUN 65536

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

__u64 seq = 0;
__u64 lost = 0;

static long produce_one(__u64 i, void *ctx)
{
	struct params *p = ctx;
	struct network_event *e;
	__u64 n;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&lost, 1);
		return 0; /* keep counting: every record asked for is produced or lost */
	}
	__builtin_memset(e, 0, sizeof(*e));
	n = __sync_fetch_and_add(&seq, 1);
	e->timestamp_ns = bpf_ktime_get_ns();
	e->config_generation = p->generation;
	e->pid = p->pid;
	e->tid = p->tid;
	e->event_type = 1; /* EV_CONN_REFUSED */
	e->family = 2;     /* AF_INET */
	e->pid_source = 1;
	e->old_state = 2; /* SYN_SENT */
	e->new_state = 7; /* CLOSE */
	e->flags = 1;     /* RST */
	e->sport = p->port_base + (n & 0x3fff);
	e->dport = p->dport;
	e->saddr[0] = 127;
	e->saddr[3] = 1;
	e->daddr[0] = 127;
	e->daddr[3] = 1;
	e->sk_err = 111;
	e->duration_ns = 12345;
	__builtin_memcpy(e->comm, "tapio-synth", 12);
	tapio_submit(&events, e);
	return 0;
}

SEC("xdp")
int produce(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct params *p = data;
	struct params copy;

	if ((void *)(p + 1) > end)
		return XDP_ABORTED;
	copy = *p;
	if (copy.count > MAX_PER_RUN)
		copy.count = MAX_PER_RUN;
	bpf_loop(copy.count, produce_one, &copy, 0);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
