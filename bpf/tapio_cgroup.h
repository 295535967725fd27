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

/* The current task's memory controller cgroup id (v1 on hybrid hosts), by probe reads. */
static __always_inline __u64 tapio_current_memcg_id(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	int ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id);
	return tapio_subsys_cgroup_id(task, ok,
				      ok ? bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id) : 0);
}

/*
 * From 5.11 tracing programs get the current task as a BTF pointer (bpf_get_current_task_btf):
 * its cgroup pointers are then plain loads instead of one probe-read helper call per pointer
 * (five per controller) on every connect(). libbpf resolves this check against the running
 * kernel's BTF at load; on 5.10 the branch is dead code the verifier never walks (and removes),
 * so the probe-read path serves it. Only for tp_btf programs: the agent's own load probe refuses
 * a classic tracepoint that names a helper the kernel lacks, even in dead code (storage).
 */
#define TAPIO_HAVE_TASK_BTF bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_get_current_task_btf)

/* The cgroup controller `id` places the task of `cs` in, by plain loads; NULL if none. */
static __always_inline struct cgroup *tapio_css_set_cgroup(struct css_set *cs, int ok, __u32 id)
{
	if (!ok || id >= 12 || !cs) /* CGROUP_SUBSYS_COUNT bound for the verifier */
		return 0;
	struct cgroup_subsys_state *css = cs->subsys[id];
	return css ? css->cgroup : 0;
}

/* kn->id of a cgroup reached by plain loads (the directory's inode), 0 for none. */
static __always_inline __u64 tapio_cgroup_kn_id(struct cgroup *cg)
{
	struct kernfs_node *kn = cg ? cg->kn : 0;
	return kn ? kn->id : 0;
}

/* kn->id of the cgroup controller `id` places the task of `cs` in, by plain loads; 0 if none. */
static __always_inline __u64 tapio_css_set_cgroup_id(struct css_set *cs, int ok, __u32 id)
{
	return tapio_cgroup_kn_id(tapio_css_set_cgroup(cs, ok, id));
}

/* The connecting task's three cgroup ids (tp_btf programs only, see TAPIO_HAVE_TASK_BTF). */
static __always_inline void tapio_current_cgroup_ids(struct tapio_cgroup_ids *out)
{
	int cpu_ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, cpu_cgrp_id);
	__u32 cpu = cpu_ok ? bpf_core_enum_value(enum cgroup_subsys_id, cpu_cgrp_id) : 0;
	int mem_ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id);
	__u32 mem = mem_ok ? bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id) : 0;

	if (TAPIO_HAVE_TASK_BTF) {
		struct css_set *cs = bpf_get_current_task_btf()->cgroups;
		/* What bpf_get_current_cgroup_id() returns, without the call. */
		out->cgroup_id = cs ? tapio_cgroup_kn_id(cs->dfl_cgrp) : 0;
		out->memcg_id = tapio_css_set_cgroup_id(cs, mem_ok, mem);
		out->cpu_id = tapio_css_set_cgroup_id(cs, cpu_ok, cpu);
		return;
	}
	out->cgroup_id = bpf_get_current_cgroup_id();
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	out->memcg_id = tapio_subsys_cgroup_id(task, mem_ok, mem);
	out->cpu_id = tapio_subsys_cgroup_id(task, cpu_ok, cpu);
}

/*
 * The current task's comm into dst[16] (tp_btf programs only, see TAPIO_HAVE_TASK_BTF): two
 * plain loads instead of bpf_get_current_comm()'s string copy. The kernel keeps comm
 * NUL-terminated; bytes after the NUL may be left from a longer earlier name on kernels that do
 * not pad it, and userspace reads up to the first NUL.
 */
static __always_inline void tapio_current_comm(char dst[16])
{
	if (TAPIO_HAVE_TASK_BTF)
		__builtin_memcpy(dst, bpf_get_current_task_btf()->comm, 16);
	else
		bpf_get_current_comm(dst, 16);
}

#endif /* TAPIO_CGROUP_H */
