/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The container observer's ring-buffer record. Natural alignment, no implicit padding, size a
 * multiple of 8. Mirrored in src/tapio/observers/container.py (CONTAINER_EVENT) and asserted
 * field by field against this object's BTF in tests/unit/test_abi_layout_container_storage.py.
 */
#ifndef TAPIO_CONTAINER_H
#define TAPIO_CONTAINER_H

#define CT_EV_OOM_KILL 1 /* oom/mark_victim: the kernel chose this process as an OOM victim */
#define CT_EV_EXIT     2 /* sched_process_exit of the last thread: abnormal process exit */

/* container_event.flags */
#define CT_FLAG_CORE_DUMPED   (1U << 0) /* exit status carries the core-dump bit (0x80) */
#define CT_FLAG_TASK_CGROUPS  (1U << 1) /* cgroup ids and the limit were read from the task itself */
#define CT_FLAG_RSS_FIELDS    (1U << 2) /* OOM: the tracepoint carried the kB fields */
#define CT_FLAG_GROUP_FALLBACK (1U << 3) /* EXIT: no group_dead in the tracepoint, used signal->live */
#define CT_FLAG_LIMIT_VALID   (1U << 4) /* memory_limit_pages was read from the memory cgroup */

/* observer-specific tapio_metrics indices */
#define CT_METRIC_OOM_EXIT_SUPPRESSED (TAPIO_METRIC_OBSERVER_BASE + 0) /* victim's SIGKILL death */
#define CT_METRIC_EXIT_IGNORED        (TAPIO_METRIC_OBSERVER_BASE + 1) /* ignore lists / scope */

struct container_event {
	__u64 timestamp_ns;        /*   0: bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 cgroup_id;           /*   8: cgroup2 (default hierarchy) cgroup id = directory inode */
	__u64 memcg_id;            /*  16: memory controller's cgroup id (v1 hierarchy on hybrid hosts) */
	__u64 cpu_cgroup_id;       /*  24: cpu controller's cgroup id */
	__u64 memory_usage_bytes;  /*  32: OOM: (anon + file + shmem rss kB) * 1024 */
	__u64 memory_limit_pages;  /*  40: memory cgroup's page_counter max (pages), see flags */
	__u64 total_vm_kb;         /*  48: OOM only */
	__u64 anon_rss_kb;         /*  56: OOM only */
	__u64 file_rss_kb;         /*  64: OOM only */
	__u64 shmem_rss_kb;        /*  72: OOM only */
	__u32 config_generation;   /*  80 */
	__u32 pid;                 /*  84: tgid (OOM: the victim) */
	__u32 tid;                 /*  88: EXIT: the thread that ended the group; OOM: 0 */
	__s32 exit_code;           /*  92: status >> 8 (0 for signal deaths) */
	__s32 signal;              /*  96: status & 0x7f */
	__u32 raw_status;          /* 100: the wait status as the kernel holds it */
	__u8 event_type;           /* 104: CT_EV_* */
	__u8 flags;                /* 105: CT_FLAG_* */
	__s16 oom_score_adj;       /* 106: OOM only */
	__u32 uid;                 /* 108: OOM only */
	char comm[16];             /* 112 */
};                             /* 128 bytes */

#endif /* TAPIO_CONTAINER_H */
