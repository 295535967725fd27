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

/*
 * DNS (cgroup_skb programs at the cgroup v2 root). A query leaving any socket is remembered in
 * dns_pending, keyed by its 5-tuple and DNS id; the matching answer deletes it. Only an answer
 * that failed or came late leaves the kernel (struct dns_event on the dns_events ring); a query
 * that is never answered is found by the agent's sweep of dns_pending. Mirrored in
 * src/tapio/observers/dns/record.py and asserted in tests/unit/test_abi_layout_dns.py.
 */
#define DNS_EV_ERROR   1 /* answer with an RCODE the config reports (SERVFAIL, REFUSED, ...) */
#define DNS_EV_SLOW    2 /* answer later than dns_slow_ns */
#define DNS_EV_TIMEOUT 3 /* no answer within dns_timeout_ns: built by the agent's sweep */

#define DNS_PID_NONE   0 /* no task context (the program variant without pid helpers) */
#define DNS_PID_SENDER 1 /* UDP: the send ran in the sending task's own system call */
#define DNS_PID_TCP    2 /* TCP: the task on the CPU when the segment left, same uid as the socket */
#define DNS_PID_OTHER  3 /* the task on the CPU is not the socket's owner (uid differs, or pid 0) */

#define DNS_QRAW_LEN 128 /* bytes of the question section kept (name, then type and class) */

/* observer-specific tapio_metrics indices of the DNS programs */
#define NET_METRIC_DNS_TRACKED     (TAPIO_METRIC_OBSERVER_BASE + 8)  /* queries put in dns_pending */
#define NET_METRIC_DNS_ANSWERED    (TAPIO_METRIC_OBSERVER_BASE + 9)  /* answers matched (and deleted) */
#define NET_METRIC_DNS_UNMATCHED   (TAPIO_METRIC_OBSERVER_BASE + 10) /* answer with no pending query */
#define NET_METRIC_DNS_RETRANSMIT  (TAPIO_METRIC_OBSERVER_BASE + 11) /* same key still pending */
#define NET_METRIC_DNS_MALFORMED   (TAPIO_METRIC_OBSERVER_BASE + 12) /* DNS port, not a DNS message */

struct dns_key {
	__u8 client[16];    /*  0: IPv4 in the first 4 bytes (network order) */
	__u8 server[16];    /* 16 */
	__u16 client_port;  /* 32: host byte order */
	__u16 server_port;  /* 34 */
	__u16 dns_id;       /* 36 */
	__u8 family;        /* 38: AF_INET or AF_INET6 */
	__u8 proto;         /* 39: IPPROTO_UDP or IPPROTO_TCP */
};                          /* 40 bytes */

struct dns_query {
	__u64 sent_ns;      /*   0: bpf_ktime_get_ns() of the first transmission */
	__u64 cgroup_id;    /*   8: cgroup v2 id of the sending socket */
	__u32 pid;          /*  16: tgid, see pid_source */
	__u32 tid;          /*  20 */
	__u8 pid_source;    /*  24: DNS_PID_* */
	__u8 qraw_len;      /*  25: bytes valid in qraw */
	__u16 qflags;       /*  26: the query's header flags */
	__u32 _pad;         /*  28 */
	char comm[16];      /*  32 */
	__u8 qraw[DNS_QRAW_LEN]; /* 48: question section as sent */
};                          /* 176 bytes */

struct dns_event {
	__u64 timestamp_ns;      /*   0: bpf_ktime_get_ns() of the answer */
	__u32 config_generation; /*   8 */
	__u32 _pad0;             /*  12 */
	struct dns_key key;      /*  16 */
	struct dns_query query;  /*  56 */
	__u64 latency_ns;        /* 232: answer - first transmission */
	__u8 event_type;         /* 240: DNS_EV_* */
	__u8 rcode;              /* 241: the answer's RCODE */
	__u16 aflags;            /* 242: the answer's header flags */
	__u32 _pad1;             /* 244 */
};                               /* 248 bytes */

#endif /* TAPIO_NETWORK_H */
