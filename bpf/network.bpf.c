// SPDX-License-Identifier: GPL-2.0
/*
 * Network observer: failed connects (refused vs timed out, exactly one record per connect),
 * retransmit spikes per destination within a window, and RTT degradation against a baseline
 * learned from ongoing smoothed-RTT samples per destination. Everything else is filtered here,
 * so an ordinary connection lifecycle sends nothing to userspace.
 *
 * Who a record is about (pid, tid, comm and the cgroup ids) is captured at connect(), the only
 * moment the connecting task is `current`: refusals, timeouts, retransmits and RTT samples are
 * seen in softirq or timer context, whose current task has nothing to do with the socket.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#include "tapio_common.h"
#include "tapio_cgroup.h"
#include "network.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define ECONNREFUSED 111
#define IPPROTO_TCP 6

/*
 * 2 MiB: 13,797 records of 152 bytes (record and header), over a quarter of a second of a fast
 * connect() loop with the agent getting no CPU at all; a 50,000-refusal burst is delivered whole
 * as long as the agent drains at three quarters of the loop's rate meanwhile. The memory is the
 * kernel's, allocated once at load; the agent maps the data area twice (a record that wraps
 * stays contiguous), so it shows as 4 MiB of the agent's RSS.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 2 * 1024 * 1024);
} events SEC(".maps");

/*
 * Sockets we saw connect(): who called it, and whether an RST answered. Kept for the socket's
 * life, so a retransmit spike or an RTT degradation of an established connection names its
 * connector too.
 */
struct conn_info {
	__u64 start_ns;
	struct tapio_cgroup_ids cg;
	__u32 pid;
	__u32 tid;
	__u8 rst_seen;
	__u8 _pad[7];
	char comm[16];
};

/* 5.10 and 5.11 (no BPF atomics): an LRU hash keyed by the sock address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct conn_info);
} conns SEC(".maps");

/*
 * 5.12+: the same records in a slot table, without a hash map. The LRU's insert at connect and
 * its lookup and delete at close (a bucket lock, the LRU list locks, a hash of the key) were
 * about half of what a refused connect cost the network programs; here a socket's set is one
 * inlined array lookup, found by a multiplicative hash of the sock address, and its slot is taken
 * and handed on by compare-and-swap and exchange, without a lock.
 *
 * A slot's owner word says who may write the rest of it: CONN_SLOT_FREE, CONN_SLOT_BUSY (a
 * connect is writing it, having taken it by compare-and-swap), or the address of the socket it
 * describes, with CONN_SLOT_RST or'ed in once an RST answered its SYN (a socket is at least
 * 8-byte aligned, so the low bits are free). Every program that reads or changes a socket's slot
 * runs under that socket's lock (its state changes, RSTs, retransmits and received segments are
 * serialised by the kernel), so a slot's only concurrent writer is another socket's connect
 * taking it over when its set is full. Readers therefore copy first and then confirm by a
 * compare-and-swap that the owner word is still theirs: a take-over in the meantime makes the
 * copy worthless and it is dropped, never reported. Outcomes are the LRU's: a full set gives
 * its oldest slot to the new connect (the evicted socket's later evidence has no owner), and a
 * close we never saw (a program run the kernel skipped) leaves a slot that the next socket at
 * that address takes back, or that ages out the same way.
 */
#define CONN_SLOT_WAYS 4
#define CONN_SLOT_SETS_LOG2 13
#define CONN_SLOT_FREE 0ULL
#define CONN_SLOT_BUSY 1ULL
#define CONN_SLOT_RST 2ULL
#define CONN_SLOT_NONE CONN_SLOT_WAYS

struct conn_set {
	__u64 owner[CONN_SLOT_WAYS]; /* first: a set's scan reads one cache line */
	struct conn_info val[CONN_SLOT_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << CONN_SLOT_SETS_LOG2);
	__type(key, __u32);
	__type(value, struct conn_set);
} conn_slots SEC(".maps");

/*
 * A socket's name in the slot table: its address less the table's own, a number (the verifier
 * allows no other arithmetic on a kernel pointer) that is the same for every program of the
 * object, never FREE or BUSY, and a multiple of 8 like both addresses.
 */
static __always_inline __u64 conn_slot_key(const void *sk)
{
	return (__u64)sk - (__u64)&conn_slots;
}

static __always_inline struct conn_set *conn_set_of(__u64 skey)
{
	__u32 i = (__u32)((skey * 0x9E3779B97F4A7C15ULL) >> (64 - CONN_SLOT_SETS_LOG2));
	return bpf_map_lookup_elem(&conn_slots, &i);
}

static __always_inline __u64 conn_owner(const struct conn_set *set, __u32 w)
{
	return *(volatile const __u64 *)&set->owner[w];
}

/* The way of `set` holding socket `skey` (its owner word in *seen), or CONN_SLOT_NONE. */
static __always_inline __u32 conn_way(const struct conn_set *set, __u64 skey, __u64 *seen)
{
	for (__u32 w = 0; w < CONN_SLOT_WAYS; w++) {
		__u64 o = conn_owner(set, w);
		if ((o & ~CONN_SLOT_RST) == skey) {
			*seen = o;
			return w;
		}
	}
	return CONN_SLOT_NONE;
}

static __always_inline int conn_cas(struct conn_set *set, __u32 w, __u64 seen, __u64 to)
{
	return __sync_val_compare_and_swap(&set->owner[w], seen, to) == seen;
}

/* The connecting task (current) as the owner of a connect at `now`. */
static __always_inline void conn_fill(struct conn_info *ci, __u64 now)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	ci->start_ns = now;
	ci->pid = pid_tgid >> 32;
	ci->tid = (__u32)pid_tgid;
	ci->rst_seen = 0;
	tapio_current_comm(ci->comm);
	tapio_current_cgroup_ids(&ci->cg);
}

/* Remember the connecting task as the owner of socket `sk`. */
static __always_inline void conn_record(const void *sk, int slots)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 skey = slots ? conn_slot_key(sk) : (__u64)sk;
	if (!slots) {
		struct conn_info ci = {};
		conn_fill(&ci, now);
		bpf_map_update_elem(&conns, &skey, &ci, BPF_ANY);
		return;
	}
	struct conn_set *set = conn_set_of(skey);
	if (!set)
		return;
	/* One pass: this socket's own slot (a close we never saw), else the first free one. */
	__u32 mine = CONN_SLOT_NONE;
	__u64 seen = CONN_SLOT_FREE;
	for (__u32 w = 0; w < CONN_SLOT_WAYS; w++) {
		__u64 o = conn_owner(set, w);
		if ((o & ~CONN_SLOT_RST) == skey) {
			mine = w;
			seen = o;
			break;
		}
		if (o == CONN_SLOT_FREE && mine == CONN_SLOT_NONE)
			mine = w;
	}
	if (mine == CONN_SLOT_NONE) {
		/* The set is full: its oldest connect makes room, as the LRU evicted its oldest. */
		__u64 oldest_ns = ~0ULL;
		for (__u32 w = 0; w < CONN_SLOT_WAYS; w++) {
			__u64 o = conn_owner(set, w);
			__u64 started = set->val[w].start_ns;
			if (o != CONN_SLOT_BUSY && started < oldest_ns) {
				mine = w;
				seen = o;
				oldest_ns = started;
			}
		}
	}
	/* Lost to another CPU (or all busy): this connect goes unrecorded, and its close is
	 * counted as untracked. */
	if (mine >= CONN_SLOT_WAYS || !conn_cas(set, mine, seen, CONN_SLOT_BUSY))
		return;
	conn_fill(&set->val[mine], now);
	__sync_lock_test_and_set(&set->owner[mine], skey); /* publish: a full barrier */
}

/*
 * Copy socket `sk`'s record to *out (when `out` is given) and, with `forget`, drop the record.
 * 1 when there was one. A copy that a take-over overwrote while it was made is not returned
 * (and the record, no longer this socket's, is left to its new owner).
 */
static __always_inline int conn_read(const void *sk, struct conn_info *out, int forget, int slots)
{
	__u64 skey = slots ? conn_slot_key(sk) : (__u64)sk;
	if (!slots) {
		struct conn_info *ci = bpf_map_lookup_elem(&conns, &skey);
		if (!ci)
			return 0;
		if (out) /* before the delete: a deleted LRU element may be reused at once */
			__builtin_memcpy(out, ci, sizeof(*out));
		if (forget)
			bpf_map_delete_elem(&conns, &skey);
		return 1;
	}
	struct conn_set *set = conn_set_of(skey);
	if (!set)
		return 0;
	__u64 seen = 0;
	__u32 w = conn_way(set, skey, &seen);
	if (w >= CONN_SLOT_WAYS)
		return 0;
	if (out) {
		__builtin_memcpy(out, &set->val[w], sizeof(*out));
		out->rst_seen = (seen & CONN_SLOT_RST) != 0;
	}
	/* Freed, or confirmed still this socket's: either way the copy is whole. */
	return conn_cas(set, w, seen, forget ? CONN_SLOT_FREE : seen);
}

/* Mark the connect of socket `sk` as answered by an RST. */
static __always_inline void conn_mark_rst(const void *sk, int slots)
{
	__u64 skey = slots ? conn_slot_key(sk) : (__u64)sk;
	if (!slots) {
		struct conn_info *ci = bpf_map_lookup_elem(&conns, &skey);
		if (ci)
			ci->rst_seen = 1;
		return;
	}
	struct conn_set *set = conn_set_of(skey);
	if (!set)
		return;
	__u64 seen = 0;
	__u32 w = conn_way(set, skey, &seen);
	if (w < CONN_SLOT_WAYS)
		conn_cas(set, w, seen, seen | CONN_SLOT_RST);
}

struct dest_key {
	__u8 daddr[16];
	__u16 dport;
	__u8 family;
	__u8 _pad[5];
};

struct retrans_state {
	__u64 window_start_ns;
	__u32 count;
	__u32 reported;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct dest_key);
	__type(value, struct retrans_state);
} retrans SEC(".maps");

struct rtt_state {
	__u64 last_sample_ns;
	__u64 last_report_ns;
	__u32 baseline_us;
	__u32 samples;
	__u32 spiking;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct dest_key);
	__type(value, struct rtt_state);
} rtt SEC(".maps");

/* A destination re-reports an RTT spike at most this often even if it flaps. */
#define RTT_REPORT_INTERVAL_NS (1000ULL * 1000 * 1000)

static __always_inline void fill_owner(struct network_event *e, const struct conn_info *ci)
{
	e->pid = ci->pid;
	e->tid = ci->tid;
	e->pid_source = NET_PID_CONNECT;
	e->cgroup_id = ci->cg.cgroup_id;
	e->memcg_id = ci->cg.memcg_id;
	e->cpu_cgroup_id = ci->cg.cpu_id;
	__builtin_memcpy(e->comm, ci->comm, sizeof(e->comm));
}

static __always_inline void read_tcp_counters(struct network_event *e, const void *skaddr)
{
	const struct tcp_sock *tp = skaddr;
	if (!tp)
		return;
	e->total_retrans = BPF_CORE_READ(tp, total_retrans);
	e->snd_cwnd = BPF_CORE_READ(tp, snd_cwnd);
}

/*
 * Copy a socket's addresses. tp_btf programs see the struct sock itself, so the IPv4 addresses
 * are two plain loads from its common part, with no probe-read helper call; the IPv6 ones are
 * copied 16 bytes at a time by probe read, which keeps the object small.
 */
static __always_inline void sk_addrs(struct network_event *e, const struct sock *sk, __u16 family)
{
	e->family = family;
	if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&e->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&e->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		*(__u32 *)e->saddr = sk->__sk_common.skc_rcv_saddr;
		*(__u32 *)e->daddr = sk->__sk_common.skc_daddr;
	}
}

/*
 * The local port, host order. inet_sport, not skc_num: the close transition is traced after
 * inet_put_port() zeroed skc_num. inet_sport lies past struct sock, which a BTF pointer to a sock
 * may not reach, so the socket is first re-typed by bpf_skc_to_tcp_sock (a check of the
 * protocol, no copy), then read with a plain load.
 */
static __always_inline __u16 sk_sport(const struct sock *sk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);
	return tp ? bpf_ntohs(tp->inet_conn.icsk_inet.inet_sport) : 0;
}

/*
 * tp_btf (raw tracepoint with BTF-typed arguments): no trace record is assembled for us, and the
 * socket's fields are plain loads (no probe-read helper), which keeps the cost on every TCP state
 * change of the node to a few loads. The transitions that can never become evidence (everything
 * but connect() and a close) leave before anything else is read.
 */
static __always_inline int set_state(const struct sock *sk, int oldstate, int newstate, int slots)
{
	const struct tapio_config *cfg;
	int connecting = oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT;

	if (!connecting && newstate != TCP_CLOSE)
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;

	if (connecting) {
		/* connect(): runs in the caller's context, so current is the owner. */
		if (tapio_config_on(&cfg, TAPIO_FLAG_NETWORK))
			conn_record(sk, slots);
		return 0;
	}

	/* Any other close forgets the socket, whatever the config says. */
	if (oldstate != TCP_SYN_SENT) {
		conn_read(sk, 0, 1, slots);
		return 0;
	}
	struct conn_info ci = {}; /* zeroed: clang may read a field before testing the result */
	int tracked = conn_read(sk, &ci, 1, slots);
	if (!tapio_config_on(&cfg, TAPIO_FLAG_NETWORK))
		return 0;
	__u32 generation = cfg->generation;

	__u32 sk_err = sk->sk_err;
	int rst = tracked && ci.rst_seen;
	__u8 type;
	if (rst)
		type = NET_EV_CONN_REFUSED;
	else if (sk_err == ECONNREFUSED)
		type = NET_EV_CONN_REFUSED; /* ICMP port unreachable, no RST */
	else if (sk_err != 0)
		type = NET_EV_CONN_TIMEOUT; /* SYN retries exhausted (ETIMEDOUT or an ICMP soft error) */
	else {
		/* The application closed a socket still in SYN_SENT: not a kernel failure. */
		tapio_metric_inc(tracked ? NET_METRIC_CONNECT_ABORTED : NET_METRIC_UNTRACKED_CLOSE);
		return 0;
	}

	struct network_event *e = TAPIO_RESERVE(&events, struct network_event);
	if (!e)
		return 0;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->config_generation = generation;
	e->event_type = type;
	e->old_state = oldstate;
	e->new_state = newstate;
	e->sport = sk_sport(sk);
	e->dport = bpf_ntohs(sk->__sk_common.skc_dport);
	e->sk_err = sk_err;
	if (rst)
		e->flags |= NET_FLAG_RST;
	sk_addrs(e, sk, sk->__sk_common.skc_family);
	if (tracked) {
		fill_owner(e, &ci);
		e->duration_ns = e->timestamp_ns - ci.start_ns;
	} else {
		tapio_metric_inc(NET_METRIC_UNTRACKED_CLOSE);
	}
	tapio_submit(&events, e);
	return 0;
}

/*
 * Every program that reads or writes the connect records comes in two builds, the slot table's
 * (5.12+) and the LRU hash's (5.10, 5.11); the agent loads the slot builds together or not at all.
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(handle_set_state_slot, const struct sock *sk, const int oldstate, const int newstate)
{
	return set_state(sk, oldstate, newstate, 1);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(handle_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	return set_state(sk, oldstate, newstate, 0);
}

/* An RST matters only to a connect in SYN_SENT (the close path reads rst_seen only then). */
SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(handle_receive_reset_slot, struct sock *sk)
{
	if (sk->__sk_common.skc_state == TCP_SYN_SENT)
		conn_mark_rst(sk, 1);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(handle_receive_reset, struct sock *sk)
{
	if (sk->__sk_common.skc_state == TCP_SYN_SENT)
		conn_mark_rst(sk, 0);
	return 0;
}

/*
 * The retransmit hook is a BTF-typed raw tracepoint: its arguments (sock, skb) are the same on
 * every kernel >= 5.10, whereas the classic tracepoint's record changed type (tcp_event_sk_skb
 * until 6.9, its own tcp_retransmit_skb with an "err" field from 6.10). 6.10+ also fires it for
 * attempts that were not sent (third argument err != 0); the CO-RE check below is resolved by
 * libbpf at load, so older kernels never see the access to an argument they do not have.
 */
static __always_inline int retransmit(unsigned long long *ctx, const struct sock *sk,
				      const struct sk_buff *skb, int slots)
{
	struct tapio_config cfg;
	if (bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err)) {
		int err = (int)ctx[2];
		if (err != 0) /* not sent (e.g. -EBUSY: the original is still in a qdisc) */
			return 0;
	}
	if (!tapio_config_gate(&cfg, TAPIO_FLAG_NETWORK))
		return 0;
	if (cfg.retransmit_threshold == 0 || cfg.retransmit_window_ns == 0)
		return 0;
	/*
	 * Count segments, not skbs: with TSO/GSO one retransmitted skb can carry dozens of MSS
	 * segments, and the kernel's RetransSegs adds tcp_skb_pcount(skb). The count lives in
	 * TCP_SKB_CB(skb)->tcp_gso_segs, i.e. inside skb->cb.
	 */
	__u16 segs = 0;
	const struct tcp_skb_cb *cb =
		(const void *)((__u64)skb + bpf_core_field_offset(struct sk_buff, cb));
	if (bpf_core_read(&segs, sizeof(segs), &cb->tcp_gso_segs) != 0 || segs == 0)
		segs = 1;

	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u16 dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	struct dest_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.family = family;
	key.dport = dport;
	if (family == AF_INET6)
		BPF_CORE_READ_INTO(&key.daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	else
		BPF_CORE_READ_INTO((__u32 *)key.daddr, sk, __sk_common.skc_daddr);
	__u64 now = bpf_ktime_get_ns();
	struct retrans_state *st = bpf_map_lookup_elem(&retrans, &key);
	if (!st) {
		struct retrans_state init = {.window_start_ns = now, .count = 0, .reported = 0};
		bpf_map_update_elem(&retrans, &key, &init, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&retrans, &key);
		if (!st)
			return 0;
	}
	if (now - st->window_start_ns > cfg.retransmit_window_ns) {
		st->window_start_ns = now;
		st->count = 0;
		st->reported = 0;
	}
	__sync_fetch_and_add(&st->count, segs); /* no fetch variant: keeps -mcpu=v1 */
	__u32 count = st->count;
	if (count < cfg.retransmit_threshold || st->reported)
		return 0;
	st->reported = 1;

	struct network_event *e = TAPIO_RESERVE(&events, struct network_event);
	if (!e)
		return 0;
	int tcp_state = BPF_CORE_READ(sk, __sk_common.skc_state);
	e->timestamp_ns = now;
	e->config_generation = cfg.generation;
	e->event_type = NET_EV_RETRANS_SPIKE;
	e->old_state = tcp_state;
	e->new_state = tcp_state;
	e->sport = bpf_ntohs(BPF_CORE_READ((const struct inet_sock *)sk, inet_sport));
	e->dport = dport;
	e->retrans_count = count;
	e->duration_ns = cfg.retransmit_window_ns;
	sk_addrs(e, sk, family);
	read_tcp_counters(e, (const void *)sk);
	struct conn_info ci = {}; /* zeroed: clang may read a field before testing the result */
	if (conn_read(sk, &ci, 0, slots))
		fill_owner(e, &ci);
	tapio_submit(&events, e);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(handle_retransmit_slot, const struct sock *sk, const struct sk_buff *skb)
{
	return retransmit(ctx, sk, skb, 1);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(handle_retransmit, const struct sock *sk, const struct sk_buff *skb)
{
	return retransmit(ctx, sk, skb, 0);
}

static __always_inline int tcp_probe(const struct sock *sk, int slots)
{
	const struct tapio_config *cfgp;
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	__u32 srtt = BPF_CORE_READ(tp, srtt_us) >> 3; /* microseconds */
	if (srtt == 0)
		return 0;
	/* Every segment received on an established socket: the carrier by pointer, each field
	 * read once, not a 256-byte copy. */
	if (!tapio_config_on(&cfgp, TAPIO_FLAG_NETWORK))
		return 0;
	struct {
		__u32 generation, rtt_spike_multiplier, rtt_spike_abs_us, rtt_min_baseline_samples;
		__u32 rtt_min_delta_us, rtt_sample_interval_us;
	} cfg = {
		.generation = cfgp->generation,
		.rtt_spike_multiplier = cfgp->rtt_spike_multiplier,
		.rtt_spike_abs_us = cfgp->rtt_spike_abs_us,
		.rtt_min_baseline_samples = cfgp->rtt_min_baseline_samples,
		.rtt_min_delta_us = cfgp->rtt_min_delta_us,
		.rtt_sample_interval_us = cfgp->rtt_sample_interval_us,
	};
	if (cfg.rtt_min_baseline_samples == 0 ||
	    (cfg.rtt_spike_multiplier == 0 && cfg.rtt_spike_abs_us == 0))
		return 0;

	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u16 dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	struct dest_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.family = family;
	key.dport = dport;
	if (family == AF_INET6)
		BPF_CORE_READ_INTO(&key.daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	else
		BPF_CORE_READ_INTO((__u32 *)key.daddr, sk, __sk_common.skc_daddr);
	__u64 now = bpf_ktime_get_ns();
	struct rtt_state *st = bpf_map_lookup_elem(&rtt, &key);
	if (!st) {
		struct rtt_state init = {.last_sample_ns = now, .baseline_us = srtt, .samples = 1};
		bpf_map_update_elem(&rtt, &key, &init, BPF_NOEXIST);
		return 0;
	}
	__u64 interval = (__u64)cfg.rtt_sample_interval_us * 1000;
	if (now - st->last_sample_ns < interval)
		return 0;
	st->last_sample_ns = now;

	__u64 base = st->baseline_us;
	if (st->samples < cfg.rtt_min_baseline_samples) {
		/* Learning: running mean of the first samples. */
		__u64 n = st->samples + 1;
		st->baseline_us = (base * (n - 1) + srtt) / n;
		st->samples = n;
		return 0;
	}

	int spike = 0;
	if (cfg.rtt_spike_multiplier && (__u64)srtt > base * cfg.rtt_spike_multiplier)
		spike = 1;
	if (cfg.rtt_spike_abs_us && srtt > cfg.rtt_spike_abs_us)
		spike = 1;
	if ((__u64)srtt < base + cfg.rtt_min_delta_us)
		spike = 0;

	if (!spike) {
		/* Clear only once back below halfway to the threshold (hysteresis), then keep
		 * learning: EWMA with weight 1/8, like the kernel's own srtt. */
		if (st->spiking) {
			__u64 mult = cfg.rtt_spike_multiplier ? cfg.rtt_spike_multiplier : 2;
			if ((__u64)srtt * 2 <= base * (mult + 1))
				st->spiking = 0;
			else
				return 0;
		}
		if (srtt >= base)
			st->baseline_us = base + ((__u64)srtt - base) / 8;
		else
			st->baseline_us = base - (base - (__u64)srtt) / 8;
		if (st->samples < 0xffffffff)
			st->samples += 1;
		return 0;
	}

	/* Spike samples never poison the baseline. */
	if (st->spiking || now - st->last_report_ns < RTT_REPORT_INTERVAL_NS) {
		st->spiking = 1;
		return 0;
	}
	st->spiking = 1;
	st->last_report_ns = now;

	struct network_event *e = TAPIO_RESERVE(&events, struct network_event);
	if (!e)
		return 0;
	e->timestamp_ns = now;
	e->config_generation = cfg.generation;
	e->event_type = NET_EV_RTT_SPIKE;
	e->sport = bpf_ntohs(BPF_CORE_READ((const struct inet_sock *)sk, inet_sport));
	e->dport = dport;
	sk_addrs(e, sk, family);
	e->rtt_baseline_us = base;
	e->rtt_current_us = srtt;
	e->rtt_samples = st->samples;
	e->snd_cwnd = BPF_CORE_READ(tp, snd_cwnd);
	struct conn_info ci = {}; /* zeroed: clang may read a field before testing the result */
	if (conn_read(sk, &ci, 0, slots))
		fill_owner(e, &ci);
	tapio_submit(&events, e);
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(handle_tcp_probe_slot, struct sock *sk, const struct sk_buff *skb)
{
	return tcp_probe(sk, 1);
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(handle_tcp_probe, struct sock *sk, const struct sk_buff *skb)
{
	return tcp_probe(sk, 0);
}

/* ---- DNS ------------------------------------------------------------------------------------
 * cgroup_skb programs attached at the cgroup v2 root see every packet of every socket of every
 * network namespace, at the socket layer (after reassembly on ingress, before fragmentation on
 * egress). They must stay cheap for the packets that are not DNS (dns_maybe: a few plain loads
 * from the packet and a port compare) and always return 1: Tapio observes, it never drops.
 */
#define ETH_P_IP_BE   0x0008 /* htons(0x0800) */
#define ETH_P_IPV6_BE 0xDD86 /* htons(0x86DD) */
#define DNS_HDR_LEN 12
#define DNS_RCODE_NXDOMAIN 3
_Static_assert(DNS_QRAW_LEN == 128, "the question copy masks its length with 0x7f");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} dns_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096); /* in flight at once; the oldest are evicted (and counted) */
	__type(key, struct dns_key);
	__type(value, struct dns_query);
} dns_pending SEC(".maps");

/* Whether a DNS port is configured: the carrier's list, 8 slots compared without a loop. */
static __always_inline int dns_port_match(const struct tapio_config *cfg, __u16 port)
{
	__u32 n = cfg->dns_port_count;
	if (n > TAPIO_MAX_DNS_PORTS)
		n = TAPIO_MAX_DNS_PORTS;
#pragma unroll
	for (int i = 0; i < TAPIO_MAX_DNS_PORTS; i++) {
		if (i < n && cfg->dns_ports[i] == port)
			return 1;
	}
	return 0;
}

/*
 * The fast reject, for the packets that are not DNS (nearly all of them, a loopback SYN or RST
 * included): the port straight from the packet's linear head, which for cgroup_skb starts at the
 * network header, with plain loads and no helper call or copy. 0 only when dns_l4 and
 * dns_port_match would reject the packet too; 1 when it may be DNS, or when the head is too short
 * to tell (then the full parse below decides).
 */
static __always_inline int dns_maybe(struct __sk_buff *skb, const struct tapio_config *cfg,
				     int egress)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 l4;
	__u8 proto;
	if (skb->protocol == ETH_P_IP_BE) {
		struct iphdr *ip = data;
		if ((void *)(ip + 1) > end)
			return 1;
		if (ip->ihl < 5 || (ip->frag_off & bpf_htons(0x3fff)))
			return 0;
		proto = ip->protocol;
		l4 = ip->ihl * 4;
	} else if (skb->protocol == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = data;
		if ((void *)(ip6 + 1) > end)
			return 1;
		proto = ip6->nexthdr;
		l4 = sizeof(*ip6);
	} else {
		return 0;
	}
	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
		return 0;
	__u8 *ports = data + l4; /* source then destination port, the same for UDP and TCP */
	if ((void *)(ports + 4) > end)
		return 1;
	__u16 port = egress ? ((__u16)ports[2] << 8) | ports[3] : ((__u16)ports[0] << 8) | ports[1];
	return dns_port_match(cfg, port);
}

/* Read the L3/L4 headers into *k (client/server still as source/destination) and return the
 * offset of the DNS header, or 0 when this is not a candidate (wrong protocol, too short). */
static __always_inline __u32 dns_l4(struct __sk_buff *skb, struct dns_key *k, __u16 *sport,
				    __u16 *dport, __u8 *saddr, __u8 *daddr)
{
	__u32 l4;
	__u8 proto;
	if (skb->protocol == ETH_P_IP_BE) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return 0;
		if (ip.ihl < 5 || (ip.frag_off & bpf_htons(0x3fff)))
			return 0;
		proto = ip.protocol;
		l4 = ip.ihl * 4;
		k->family = AF_INET;
		__builtin_memcpy(saddr, &ip.saddr, 4);
		__builtin_memcpy(daddr, &ip.daddr, 4);
	} else if (skb->protocol == ETH_P_IPV6_BE) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return 0;
		proto = ip6.nexthdr; /* extension headers are not followed */
		l4 = sizeof(ip6);
		k->family = AF_INET6;
		__builtin_memcpy(saddr, &ip6.saddr, 16);
		__builtin_memcpy(daddr, &ip6.daddr, 16);
	} else {
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr uh;
		if (bpf_skb_load_bytes(skb, l4, &uh, sizeof(uh)) < 0)
			return 0;
		*sport = bpf_ntohs(uh.source);
		*dport = bpf_ntohs(uh.dest);
		k->proto = IPPROTO_UDP;
		return l4 + sizeof(uh);
	}
	if (proto == IPPROTO_TCP) {
		/* ports and data offset only; the segment must carry the 2-byte length prefix */
		__u8 th[14];
		if (bpf_skb_load_bytes(skb, l4, th, sizeof(th)) < 0)
			return 0;
		*sport = ((__u16)th[0] << 8) | th[1];
		*dport = ((__u16)th[2] << 8) | th[3];
		k->proto = IPPROTO_TCP;
		__u32 doff = (th[12] >> 4) * 4;
		if (doff < 20)
			return 0;
		return l4 + doff + 2;
	}
	return 0;
}

static __always_inline void dns_handle(struct __sk_buff *skb, int egress, int with_pid)
{
	__u32 zero = 0;
	struct tapio_config *cfgp = bpf_map_lookup_elem(&tapio_config, &zero);
	if (!cfgp || cfgp->abi_version != TAPIO_CONFIG_ABI_VERSION ||
	    !(cfgp->flags & TAPIO_FLAG_NETWORK) || !(cfgp->dns_flags & TAPIO_DNS_ENABLED))
		return;
	if (!dns_maybe(skb, cfgp, egress))
		return;

	struct dns_key k;
	__builtin_memset(&k, 0, sizeof(k));
	__u8 saddr[16] = {}, daddr[16] = {};
	__u16 sport = 0, dport = 0;
	__u32 off = dns_l4(skb, &k, &sport, &dport, saddr, daddr);
	if (off == 0)
		return;
	if (!dns_port_match(cfgp, egress ? dport : sport))
		return;
	/* the DNS part of the carrier, read once per DNS packet (the rest is not needed) */
	__u64 cfg_slow_ns = cfgp->dns_slow_ns;
	__u32 cfg_generation = cfgp->generation;
	__u32 cfg_flags = cfgp->dns_flags;

	__u8 hdr[DNS_HDR_LEN];
	if (off + DNS_HDR_LEN > skb->len) {
		/* TCP handshake, ACKs and FINs carry no message: not malformed */
		if (k.proto == IPPROTO_UDP)
			tapio_metric_inc(NET_METRIC_DNS_MALFORMED);
		return;
	}
	if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
		return;
	__u16 flags = ((__u16)hdr[2] << 8) | hdr[3];
	__u16 qdcount = ((__u16)hdr[4] << 8) | hdr[5];
	int qr = flags >> 15;
	int opcode = (flags >> 11) & 0xf;
	if (opcode != 0) /* only standard queries (not NOTIFY, UPDATE, ...) */
		return;
	k.dns_id = ((__u16)hdr[0] << 8) | hdr[1];

	if (egress) {
		if (qr != 0 || qdcount != 1) {
			tapio_metric_inc(NET_METRIC_DNS_MALFORMED);
			return;
		}
		__builtin_memcpy(k.client, saddr, 16);
		__builtin_memcpy(k.server, daddr, 16);
		k.client_port = sport;
		k.server_port = dport;
		struct dns_query q;
		__builtin_memset(&q, 0, sizeof(q));
		q.sent_ns = bpf_ktime_get_ns();
		q.cgroup_id = bpf_skb_cgroup_id(skb);
		q.qflags = flags;
		if (with_pid) {
			__u64 pid_tgid = bpf_get_current_pid_tgid();
			__u32 uid = (__u32)bpf_get_current_uid_gid();
			q.pid = pid_tgid >> 32;
			q.tid = (__u32)pid_tgid;
			bpf_get_current_comm(q.comm, sizeof(q.comm));
			if (q.pid == 0 || uid != bpf_get_socket_uid(skb))
				q.pid_source = DNS_PID_OTHER;
			else
				q.pid_source = k.proto == IPPROTO_UDP ? DNS_PID_SENDER : DNS_PID_TCP;
		}
		__u32 qoff = off + DNS_HDR_LEN;
		__u32 avail = skb->len - qoff;
		if (avail >= DNS_QRAW_LEN) {
			if (bpf_skb_load_bytes(skb, qoff, q.qraw, DNS_QRAW_LEN) == 0)
				q.qraw_len = DNS_QRAW_LEN;
		} else if (avail > 0) {
			/* 1..127 in a form every verifier since 5.10 can bound: the mask sits in an asm
			 * block (clang would drop it as redundant) and the +1 after it keeps the length
			 * non-zero without a branch the verifier may not tie to this register */
			__u64 len = avail - 1;
			asm volatile("%0 &= 0x7f" : "+r"(len));
			len += 1;
			if (bpf_skb_load_bytes(skb, qoff, q.qraw, len) == 0)
				q.qraw_len = len;
		}
		if (bpf_map_update_elem(&dns_pending, &k, &q, BPF_NOEXIST) == 0)
			tapio_metric_inc(NET_METRIC_DNS_TRACKED);
		else
			tapio_metric_inc(NET_METRIC_DNS_RETRANSMIT); /* the first send's time is kept */
		return;
	}

	if (qr != 1)
		return;
	__builtin_memcpy(k.client, daddr, 16);
	__builtin_memcpy(k.server, saddr, 16);
	k.client_port = dport;
	k.server_port = sport;
	struct dns_query *q = bpf_map_lookup_elem(&dns_pending, &k);
	if (!q) {
		tapio_metric_inc(NET_METRIC_DNS_UNMATCHED);
		return;
	}
	__u64 now = bpf_ktime_get_ns();
	__u64 latency = now - q->sent_ns;
	__u8 rcode = flags & 0xf;
	__u8 type = 0;
	if (rcode == 1 || rcode == 2 || rcode == 4 || rcode == 5 ||
	    (rcode == DNS_RCODE_NXDOMAIN && (cfg_flags & TAPIO_DNS_NXDOMAIN)))
		type = DNS_EV_ERROR;
	else if (cfg_slow_ns && latency >= cfg_slow_ns)
		type = DNS_EV_SLOW;
	if (!type) {
		if (bpf_map_delete_elem(&dns_pending, &k) == 0)
			tapio_metric_inc(NET_METRIC_DNS_ANSWERED);
		return;
	}
	struct dns_event *e = TAPIO_RESERVE(&dns_events, struct dns_event);
	if (!e) {
		if (bpf_map_delete_elem(&dns_pending, &k) == 0)
			tapio_metric_inc(NET_METRIC_DNS_ANSWERED);
		return;
	}
	/* Copy before the delete: a deleted LRU element may be reused at once. */
	__builtin_memcpy(&e->query, q, sizeof(e->query));
	if (bpf_map_delete_elem(&dns_pending, &k) != 0) {
		/* the agent's sweep claimed it first (as a timeout) */
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	tapio_metric_inc(NET_METRIC_DNS_ANSWERED);
	e->timestamp_ns = now;
	e->config_generation = cfg_generation;
	__builtin_memcpy(&e->key, &k, sizeof(k));
	e->latency_ns = latency;
	e->event_type = type;
	e->rcode = rcode;
	e->aflags = flags;
	tapio_submit(&dns_events, e);
}

SEC("cgroup_skb/egress")
int dns_egress(struct __sk_buff *skb)
{
	dns_handle(skb, 1, 1);
	return 1;
}

/* The same without the task helpers, for kernels that do not offer them to cgroup_skb. */
SEC("cgroup_skb/egress")
int dns_egress_anon(struct __sk_buff *skb)
{
	dns_handle(skb, 1, 0);
	return 1;
}

SEC("cgroup_skb/ingress")
int dns_ingress(struct __sk_buff *skb)
{
	dns_handle(skb, 0, 0);
	return 1;
}
