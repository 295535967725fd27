/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The node observer's kernel-side aggregates. Nothing is sent per scheduler event: the programs
 * add every run-queue wait into per-CPU counters and a log2 histogram, and remember the worst
 * wait per CPU; userspace reads the maps once per interval and judges them (edge-triggered, with
 * hysteresis). Mirrored in src/tapio/observers/node.py and asserted field by field against this
 * object's BTF in tests/unit/test_abi_layout_node.py.
 */
#ifndef TAPIO_NODE_H
#define TAPIO_NODE_H

/*
 * Histogram slot i counts waits in [2^i, 2^(i+1)) * 1024 ns (slot 0 also holds shorter waits,
 * the last slot everything longer: 2^23 * 1024 ns ~ 8.6 s).
 */
#define RUNQ_SLOTS 24

/* observer-specific tapio_metrics indices */
#define NODE_METRIC_CLOCK_SKEW (TAPIO_METRIC_OBSERVER_BASE + 0) /* queued stamp ahead of the rq clock */

/*
 * A "long" wait: only waits at least this long are checked against a CFS-bandwidth throttle
 * mark and may become the interval's worst (runq_worst). Shorter ones are only counted in
 * runq_hist. Thresholds are whole milliseconds, so a short wait is never over one.
 */
#define RUNQ_LONG_NS (1000ULL * 1000)

/*
 * One per CPU (PERCPU_ARRAY "runq_hist", key 0). Monotonic since load; userspace works on the
 * deltas between two reads. Waits of tasks that were switched out because their cgroup ran out
 * of CPU quota are counted apart (throttled_*), not as run-queue latency: throttling is its own
 * signal, read from cpu.stat.
 */
struct runq_hist {
	__u64 waits;                /*   0: run-queue waits measured (queued -> picked) */
	__u64 wait_ns;              /*   8: their sum */
	__u64 over;                 /*  16: waits >= runq_latency_threshold_ns */
	__u64 throttled_waits;      /*  24: waits (>= RUNQ_LONG_NS) that were a throttle */
	__u64 throttled_ns;         /*  32: their sum */
	__u64 slots[RUNQ_SLOTS];    /*  40: log2 histogram, see RUNQ_SLOTS */
};                              /* 232 bytes */

/*
 * One per CPU (PERCPU_ARRAY "runq_worst", key 0): the longest wait (of at least RUNQ_LONG_NS)
 * since userspace last zeroed it (it does so after every read), and the task that waited.
 */
struct runq_worst {
	__u64 max_ns;               /*   0 */
	__u64 cgroup_id;            /*   8: cgroup v2 id of the waiting task (1 = root) */
	__u64 timestamp_ns;         /*  16: bpf_ktime_get_ns() at the switch-in (CLOCK_MONOTONIC) */
	__u32 pid;                  /*  24: tgid */
	__u32 tid;                  /*  28 */
	__u32 config_generation;    /*  32 */
	__u32 _pad;                 /*  36 */
	char comm[16];              /*  40 */
};                              /* 56 bytes */

#endif /* TAPIO_NODE_H */
