/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * struct tapio_config: the runtime configuration carrier shared by every Tapio BPF object.
 *
 * One 1-entry BPF_MAP_TYPE_ARRAY named "tapio_config" per object; userspace writes the whole
 * value in one syscall. Every program copies it to the stack once per invocation, so a torn
 * update can never mix two generations inside one decision.
 *
 * All-zeros is inert: abi_version 0 fails the guard and flags 0 disables everything. No bit may
 * ever mean "disable". Any change to this layout bumps TAPIO_CONFIG_ABI_VERSION; mirrored in
 * src/tapio/bpf/abi.py and asserted field by field in tests/unit/test_abi_layout.py.
 */
#ifndef TAPIO_CONFIG_H
#define TAPIO_CONFIG_H

#define TAPIO_CONFIG_ABI_VERSION 4

#define TAPIO_FLAG_NETWORK   (1ULL << 0)
#define TAPIO_FLAG_STORAGE   (1ULL << 1)
#define TAPIO_FLAG_CONTAINER (1ULL << 2)
#define TAPIO_FLAG_NODE      (1ULL << 3)

/* exit_flags */
#define TAPIO_EXIT_SCOPE_CONTAINERS (1U << 0) /* only tasks outside the root cgroups */

#define TAPIO_MAX_IGNORE_EXIT_CODES 16

/* dns_flags */
#define TAPIO_DNS_ENABLED  (1U << 0) /* the DNS programs track queries */
#define TAPIO_DNS_NXDOMAIN (1U << 1) /* NXDOMAIN answers are reported as dns_error */

#define TAPIO_MAX_DNS_PORTS 8

struct tapio_config {
	__u32 abi_version;               /*   0: must equal TAPIO_CONFIG_ABI_VERSION */
	__u32 generation;                /*   4: stamped into every event */
	__u64 flags;                     /*   8: TAPIO_FLAG_* */
	__u64 slow_io_threshold_ns;      /*  16: storage warning threshold, 0 = inert */
	__u64 io_latency_critical_ns;    /*  24: storage critical threshold, 0 = inert */
	__u64 retransmit_window_ns;      /*  32: retransmit_spike window, 0 = inert */
	__u32 retransmit_threshold;      /*  40: retransmits per destination within the window, 0 = inert */
	__u32 rtt_spike_multiplier;      /*  44: current > baseline * multiplier, 0 = inert */
	__u32 rtt_spike_abs_us;          /*  48: current > abs (once a baseline exists), 0 = inert */
	__u32 rtt_min_baseline_samples;  /*  52: samples before a baseline is trusted, 0 = never */
	__u32 rtt_min_delta_us;          /*  56: current must also exceed baseline by this much */
	__u32 rtt_sample_interval_us;    /*  60: per-destination sampling interval */
	__u32 exit_flags;                /*  64: TAPIO_EXIT_* */
	__u32 ignore_exit_count;         /*  68: clamped to TAPIO_MAX_IGNORE_EXIT_CODES by BPF */
	__s32 ignore_exit_codes[TAPIO_MAX_IGNORE_EXIT_CODES]; /* 72 */
	__u64 ignore_signal_mask;        /* 136: bit n set = ignore deaths by signal n */
	__u64 runq_latency_threshold_ns; /* 144: node run-queue latency threshold, 0 = inert */
	__u64 dns_slow_ns;               /* 152: answer later than this is dns_slow, 0 = inert */
	__u64 dns_timeout_ns;            /* 160: no answer within this is dns_timeout (agent sweep) */
	__u32 dns_flags;                 /* 168: TAPIO_DNS_* */
	__u32 dns_port_count;            /* 172: valid entries of dns_ports, clamped by BPF */
	__u16 dns_ports[TAPIO_MAX_DNS_PORTS]; /* 176: server ports, host byte order */
	__u64 _reserved[8];              /* 192: zero; future fields bump the ABI version */
};                                   /* 256 bytes */

#endif /* TAPIO_CONFIG_H */
