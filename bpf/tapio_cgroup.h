/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The current task's cgroup ids, for records produced later in another context (softirq,
 * timers, completions) where `current` is no longer the task the evidence is about. On a
 * cgroup2-only host all three ids name the same cgroup; on a hybrid host the v1 memory and cpu
 * controllers each have a hierarchy of their own, and container runtimes place pods there, so
 * userspace resolves whichever names a container. Include after vmlinux.h and the libbpf headers.
 */
#ifndef TAPIO_CGROUP_H
#define TAPIO_CGROUP_H

struct tapio_cgroup_ids {
	__u64 cgroup_id; /* cgroup2 (default hierarchy) id = the cgroup directory's inode */
	__u64 memcg_id;  /* memory controller's cgroup id (0 when the kernel has none) */
	__u64 cpu_id;    /* cpu controller's cgroup id */
};

/* The cgroup a controller places `task` in; NULL if the controller is not built in. */
static __always_inline struct cgroup *tapio_subsys_cgroup(struct task_struct *task, int ok,
							  __u32 id)
{
	struct cgroup_subsys_state *css = 0;
	struct css_set *cs;
	if (!ok || id >= 12) /* CGROUP_SUBSYS_COUNT bound for the verifier */
		return 0;
	cs = BPF_CORE_READ(task, cgroups);
	if (!cs)
		return 0;
	bpf_core_read(&css, sizeof(css), &cs->subsys[id]);
	if (!css)
		return 0;
	return BPF_CORE_READ(css, cgroup);
}

/* kn->id of that cgroup (the directory's inode), 0 when there is none. */
static __always_inline __u64 tapio_subsys_cgroup_id(struct task_struct *task, int ok, __u32 id)
{
	struct cgroup *cg = tapio_subsys_cgroup(task, ok, id);
	return cg ? BPF_CORE_READ(cg, kn, id) : 0;
}

/* The current task's memory controller cgroup id (v1 on hybrid hosts). */
static __always_inline __u64 tapio_current_memcg_id(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	int ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id);
	return tapio_subsys_cgroup_id(task, ok,
				      ok ? bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id) : 0);
}

static __always_inline void tapio_current_cgroup_ids(struct tapio_cgroup_ids *out)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	int cpu_ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, cpu_cgrp_id);
	__u32 cpu = cpu_ok ? bpf_core_enum_value(enum cgroup_subsys_id, cpu_cgrp_id) : 0;

	out->cgroup_id = bpf_get_current_cgroup_id();
	out->memcg_id = tapio_current_memcg_id();
	out->cpu_id = tapio_subsys_cgroup_id(task, cpu_ok, cpu);
}

#endif /* TAPIO_CGROUP_H */
