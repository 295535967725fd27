/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The network observer's ring-buffer record. Mirrored in src/tapio/observers/network.py and
 * asserted field by field against this object's BTF in tests/unit/test_abi_layout.py.
 */
#ifndef TAPIO_NETWORK_H
#define TAPIO_NETWORK_H

#define NET_EV_CONN_REFUSED  1 /* SYN_SENT -> CLOSE after an RST (or ICMP ECONNREFUSED) */
#define NET_EV_CONN_TIMEOUT  2 /* SYN_SENT -> CLOSE from the SYN retransmit timer, no RST */
#define NET_EV_RETRANS_SPIKE 3 /* retransmit_threshold retransmits to one destination within the window */
#define NET_EV_RTT_SPIKE     4 /* smoothed RTT to a destination far above its learned baseline */

#define NET_FLAG_RST 1 /* an RST answered the SYN (else ICMP or timer) */

#define NET_PID_NONE    0 /* no process owns this fact (softirq/timer, accepted socket) */
#define NET_PID_CONNECT 1 /* pid/comm/cgroups of the task that called connect() on this socket */

/* observer-specific tapio_metrics indices */
#define NET_METRIC_CONNECT_ABORTED  (TAPIO_METRIC_OBSERVER_BASE + 0) /* closed in SYN_SENT by the app */
#define NET_METRIC_UNTRACKED_CLOSE  (TAPIO_METRIC_OBSERVER_BASE + 1) /* SYN_SENT->CLOSE, connect not seen */

struct network_event {
	__u64 timestamp_ns;      /*   0: bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 config_generation; /*   8 */
	__u32 pid;               /*  12: tgid, see pid_source */
	__u32 tid;               /*  16 */
	__u8 event_type;         /*  20: NET_EV_* */
	__u8 family;             /*  21: AF_INET (2) or AF_INET6 (10) */
	__u8 pid_source;         /*  22: NET_PID_* */
	__u8 old_state;          /*  23: TCP state before the transition */
	__u8 new_state;          /*  24 */
	__u8 flags;              /*  25: NET_FLAG_* */
	__u16 sport;             /*  26: host byte order */
	__u16 dport;             /*  28: host byte order */
	__u16 _pad1;             /*  30 */
	__u8 saddr[16];          /*  32: IPv4 in the first 4 bytes (network order) */
	__u8 daddr[16];          /*  48 */
	__u32 sk_err;            /*  64: socket error at close (ETIMEDOUT, ECONNREFUSED, ...) */
	__u32 retrans_count;     /*  68: retransmits to the destination in the window */
	__u32 total_retrans;     /*  72: the socket's lifetime retransmits */
	__u32 snd_cwnd;          /*  76 */
	__u32 rtt_baseline_us;   /*  80 */
	__u32 rtt_current_us;    /*  84 */
	__u32 rtt_samples;       /*  88: samples behind the baseline */
	__u32 _pad2;             /*  92 */
	__u64 duration_ns;       /*  96: connect() to close, or the retransmit window */
	char comm[16];           /* 104 */
	__u64 cgroup_id;         /* 120: connecting task's cgroup2 id, see pid_source (0 = none) */
	__u64 memcg_id;          /* 128: its memory controller's cgroup id (v1 on hybrid hosts) */
	__u64 cpu_cgroup_id;     /* 136: its cpu controller's cgroup id */
};                           /* 144 bytes */

#endif /* TAPIO_NETWORK_H */
