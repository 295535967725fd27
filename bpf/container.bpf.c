// SPDX-License-Identifier: GPL-2.0
/*
 * Container observer: OOM kills (oom/mark_victim) and abnormal process exits
 * (sched/sched_process_exit), one record per process, never per thread.
 *
 * OOM: the victim's pid, comm and memory usage come from the tracepoint's own kB fields, read
 * through CO-RE (older kernels' mark_victim carries only the pid: then the usage is absent and
 * flagged, never guessed). The victim's cgroups (cgroup2 id, v1 memory and cpu cgroup ids) and
 * its memory cgroup's limit are read from the task when the task that runs the tracepoint is the
 * victim (a memcg OOM in a single-process container); otherwise userspace resolves them from
 * /proc/<pid>/cgroup while the victim still exists, or reports them unknown.
 *
 * The victim's own SIGKILL death is suppressed here (oom_victims map): one OOM kill gives exactly
 * one oom_kill and no abnormal_exit.
 *
 * EXIT: sched_process_exit fires once per thread; only the thread that ends the thread group is
 * considered. Kernels that pass group_dead to the tracepoint name that thread. Older kernels
 * (5.10, 6.1 and 6.12 among them) do not: there do_exit drops signal->live long before the
 * tracepoint, so when several threads exit together (exit_group) every thread that decremented
 * early but reaches the tracepoint late also reads live == 0. On those kernels the threads that
 * read live == 0 race to claim the group exit in exit_claims (keyed by tgid and the leader's
 * start time, unique per process): only the thread whose insert succeeds reports. The process
 * status is signal->group_exit_code for group exits (exit_group, fatal signals) and the task's
 * exit_code otherwise. Zero statuses, ignored codes (non-signal exits only), ignored signals and,
 * with TAPIO_EXIT_SCOPE_CONTAINERS, tasks in the root cgroup of every hierarchy are dropped here.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "tapio_common.h"
#include "tapio_cgroup.h"
#include "container.h"

char LICENSE[] SEC("license") = "GPL";

#define SIGKILL 9
#define EEXIST 17
#define SIGNAL_GROUP_EXIT 0x00000004

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* tgids chosen as OOM victims whose group exit has not been seen yet. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} oom_victims SEC(".maps");

/* A thread-group instance: the tgid and the group leader's start time (tgids are reused). */
struct exit_claim_key {
	__u32 tgid;
	__u32 pad;
	__u64 leader_start_ns;
};

/*
 * Thread groups whose exit was already claimed by one of their threads (kernels without
 * group_dead in sched_process_exit). The key never repeats, so an entry is never deleted (a
 * late thread of the group must still find it): the LRU ages entries out, and the window in
 * which one matters is the few milliseconds between the group's threads reaching the tracepoint.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct exit_claim_key);
	__type(value, __u8);
} exit_claims SEC(".maps");

static __always_inline __u64 cgroup_id_of(struct cgroup *cg)
{
	if (!cg)
		return 0;
	return BPF_CORE_READ(cg, kn, id);
}

static __always_inline int cgroup_level(struct cgroup *cg)
{
	if (!cg)
		return 0;
	return BPF_CORE_READ(cg, level);
}

static __always_inline __u32 memory_id(int *ok)
{
	*ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id);
	return *ok ? bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id) : 0;
}

static __always_inline __u32 cpu_id(int *ok)
{
	*ok = bpf_core_enum_value_exists(enum cgroup_subsys_id, cpu_cgrp_id);
	return *ok ? bpf_core_enum_value(enum cgroup_subsys_id, cpu_cgrp_id) : 0;
}

/*
 * The limit of the memory cgroup the task of `cs` is in, when the kernel has the field, into e
 * (probe reads, for both exit builds: css is embedded in struct mem_cgroup, so stepping back by
 * its offset gives the typed pointer).
 */
static __always_inline void fill_memory_limit(struct container_event *e, struct css_set *cs,
					      int mem_ok, __u32 mem)
{
	struct cgroup_subsys_state *css = 0;
	if (!mem_ok || !cs || mem >= 12 || !bpf_core_type_exists(struct mem_cgroup) ||
	    !bpf_core_field_exists(((struct mem_cgroup *)0)->memory.max))
		return;
	bpf_core_read(&css, sizeof(css), &cs->subsys[mem]);
	if (!css)
		return;
	struct mem_cgroup *mcg = (void *)css - bpf_core_field_offset(struct mem_cgroup, css);
	e->memory_limit_pages = BPF_CORE_READ(mcg, memory.max);
	e->flags |= CT_FLAG_LIMIT_VALID;
}

/*
 * Fill the task's cgroup ids and its memory cgroup's limit. Not inlined on purpose: its
 * signature puts struct container_event into the object's BTF, which the layout test reads.
 */
static __noinline int fill_task_cgroups(struct container_event *e, struct task_struct *task)
{
	int mem_ok = 0, cpu_ok = 0;
	__u32 mem = memory_id(&mem_ok), cpu = cpu_id(&cpu_ok);
	struct cgroup *dfl = BPF_CORE_READ(task, cgroups, dfl_cgrp);
	struct cgroup *memcg = tapio_subsys_cgroup(task, mem_ok, mem);
	struct cgroup *cpucg = tapio_subsys_cgroup(task, cpu_ok, cpu);

	e->cgroup_id = cgroup_id_of(dfl);
	e->memcg_id = cgroup_id_of(memcg);
	e->cpu_cgroup_id = cgroup_id_of(cpucg);
	e->flags |= CT_FLAG_TASK_CGROUPS;

	if (memcg)
		fill_memory_limit(e, BPF_CORE_READ(task, cgroups), mem_ok, mem);
	return 0;
}

SEC("tracepoint/oom/mark_victim")
int handle_mark_victim(struct trace_event_raw_mark_victim *ctx)
{
	/* Scalars first: the verifier rejects loads through a ctx pointer clang has offset. */
	__u32 pid = ctx->pid;
	__u64 total_vm = 0, anon = 0, file = 0, shmem = 0;
	__u32 uid = 0, comm_loc = 0;
	__s16 score_adj = 0;
	int have_rss = 0, have_comm = 0;
	if (bpf_core_field_exists(ctx->anon_rss) && bpf_core_field_exists(ctx->file_rss) &&
	    bpf_core_field_exists(ctx->shmem_rss)) {
		anon = BPF_CORE_READ(ctx, anon_rss);
		file = BPF_CORE_READ(ctx, file_rss);
		shmem = BPF_CORE_READ(ctx, shmem_rss);
		have_rss = 1;
	}
	if (bpf_core_field_exists(ctx->total_vm))
		total_vm = BPF_CORE_READ(ctx, total_vm);
	if (bpf_core_field_exists(ctx->uid))
		uid = BPF_CORE_READ(ctx, uid);
	if (bpf_core_field_exists(ctx->oom_score_adj))
		score_adj = BPF_CORE_READ(ctx, oom_score_adj);
	if (bpf_core_field_exists(ctx->__data_loc_comm)) {
		comm_loc = BPF_CORE_READ(ctx, __data_loc_comm);
		have_comm = 1;
	}

	struct tapio_config cfg;
	if (!tapio_config_gate(&cfg, TAPIO_FLAG_CONTAINER))
		return 0;

	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&oom_victims, &pid, &now, BPF_ANY);

	struct container_event *e = TAPIO_RESERVE(&events, struct container_event);
	if (!e)
		return 0;
	e->timestamp_ns = now;
	e->config_generation = cfg.generation;
	e->event_type = CT_EV_OOM_KILL;
	e->pid = pid;
	e->signal = SIGKILL;
	e->uid = uid;
	e->oom_score_adj = score_adj;
	if (have_rss) {
		e->anon_rss_kb = anon;
		e->file_rss_kb = file;
		e->shmem_rss_kb = shmem;
		e->total_vm_kb = total_vm;
		e->memory_usage_bytes = (anon + file + shmem) * 1024;
		e->flags |= CT_FLAG_RSS_FIELDS;
	}
	if (have_comm) {
		__u64 base = (__u64)ctx;
		bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), (void *)(base + (comm_loc & 0xffff)));
	}

	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	if ((__u32)(bpf_get_current_pid_tgid() >> 32) == pid) {
		/* The victim is running the tracepoint (memcg OOM charged by the victim itself). */
		fill_task_cgroups(e, task);
		if (!have_comm)
			bpf_get_current_comm(e->comm, sizeof(e->comm));
	}
	tapio_submit(&events, e);
	return 0;
}

/*
 * fill_task_cgroups by plain loads through the BTF-typed current task (5.11+), for the exit
 * program that runs on every process exit of the node: the same ids and limit as the probe-read
 * path, without its dozen helper calls.
 */
static __always_inline void fill_task_cgroups_btf(struct container_event *e, struct task_struct *task)
{
	int mem_ok = 0, cpu_ok = 0;
	__u32 mem = memory_id(&mem_ok), cpu = cpu_id(&cpu_ok);
	struct css_set *cs = task->cgroups;
	struct cgroup *memcg = tapio_css_set_cgroup(cs, mem_ok, mem);
	e->cgroup_id = tapio_cgroup_kn_id(cs ? cs->dfl_cgrp : 0);
	e->memcg_id = tapio_cgroup_kn_id(memcg);
	e->cpu_cgroup_id = tapio_css_set_cgroup_id(cs, cpu_ok, cpu);
	e->flags |= CT_FLAG_TASK_CGROUPS;
	if (memcg)
		fill_memory_limit(e, cs, mem_ok, mem);
}

/* Whether the task sits in the root cgroup of every hierarchy (a host process). */
static __always_inline int host_task(struct task_struct *task, const int btf)
{
	int mem_ok = 0, cpu_ok = 0;
	__u32 mem = memory_id(&mem_ok), cpu = cpu_id(&cpu_ok);
	if (btf) {
		struct css_set *cs = task->cgroups;
		struct cgroup *dfl = cs ? cs->dfl_cgrp : 0;
		struct cgroup *memcg = tapio_css_set_cgroup(cs, mem_ok, mem);
		struct cgroup *cpucg = tapio_css_set_cgroup(cs, cpu_ok, cpu);
		return (dfl ? dfl->level : 0) == 0 && (memcg ? memcg->level : 0) == 0 &&
		       (cpucg ? cpucg->level : 0) == 0;
	}
	struct cgroup *dfl = BPF_CORE_READ(task, cgroups, dfl_cgrp);
	return cgroup_level(dfl) == 0 && cgroup_level(tapio_subsys_cgroup(task, mem_ok, mem)) == 0 &&
	       cgroup_level(tapio_subsys_cgroup(task, cpu_ok, cpu)) == 0;
}

/*
 * Every process exit of the node runs this, so it is built twice from one body: with btf set
 * (handle_process_exit_btf, 5.11+) the task's fields are plain loads through
 * bpf_get_current_task_btf(); without (handle_process_exit) they are probe reads, for 5.10. The
 * agent loads the first of the two its kernel accepts (one program group); both decide and
 * record exactly the same.
 */
static __always_inline int process_exit(struct trace_event_raw_sched_process_exit *ctx, const int btf)
{
	struct task_struct *task = btf ? bpf_get_current_task_btf()
				       : (struct task_struct *)bpf_get_current_task();
	__u8 fallback = 0;
	if (bpf_core_field_exists(ctx->group_dead)) {
		if (!BPF_CORE_READ(ctx, group_dead))
			return 0; /* another thread of the group is still alive */
	} else {
		int live = btf ? task->signal->live.counter : BPF_CORE_READ(task, signal, live.counter);
		if (live != 0)
			return 0; /* another thread of the group has not reached do_exit yet */
		fallback = CT_FLAG_GROUP_FALLBACK;
	}
	if (fallback) {
		/* Several threads may read live == 0: the first to claim the group reports it. */
		struct exit_claim_key key = {
			.tgid = (__u32)(bpf_get_current_pid_tgid() >> 32),
			.leader_start_ns = btf ? task->group_leader->start_time
					       : BPF_CORE_READ(task, group_leader, start_time),
		};
		__u8 one = 1;
		/*
		 * Compared as a 32-bit int: before 6.4 the map's update op returns int and the
		 * verifier calls it directly, so r0 holds -EEXIST zero-extended (0xffffffef); a 64-bit
		 * compare with -EEXIST never matched there and every claiming thread reported.
		 */
		int claimed = (int)bpf_map_update_elem(&exit_claims, &key, &one, BPF_NOEXIST);
		if (claimed == -EEXIST)
			return 0; /* claimed by another thread of this group */
		/* any other failure: report rather than lose the exit */
	}
	const struct tapio_config *cfg;
	if (!tapio_config_on(&cfg, TAPIO_FLAG_CONTAINER))
		return 0;
	__u32 status;
	if (btf) {
		struct signal_struct *sig_s = task->signal;
		status = (sig_s->flags & SIGNAL_GROUP_EXIT) ? sig_s->group_exit_code : task->exit_code;
	} else {
		__u32 sflags = BPF_CORE_READ(task, signal, flags);
		status = (sflags & SIGNAL_GROUP_EXIT) ? BPF_CORE_READ(task, signal, group_exit_code)
						      : BPF_CORE_READ(task, exit_code);
	}
	__s32 code = (status >> 8) & 0xff;
	__s32 sig = status & 0x7f;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	/* An OOM victim's death was already reported as the oom_kill. */
	if (bpf_map_lookup_elem(&oom_victims, &tgid)) {
		bpf_map_delete_elem(&oom_victims, &tgid);
		if (sig == SIGKILL) {
			tapio_metric_inc(CT_METRIC_OOM_EXIT_SUPPRESSED);
			return 0;
		}
	}
	if (code == 0 && sig == 0)
		return 0;

	if (sig != 0) {
		if (cfg->ignore_signal_mask & (1ULL << (sig & 63))) {
			tapio_metric_inc(CT_METRIC_EXIT_IGNORED);
			return 0;
		}
	} else {
		__u32 n = cfg->ignore_exit_count;
		if (n > TAPIO_MAX_IGNORE_EXIT_CODES)
			n = TAPIO_MAX_IGNORE_EXIT_CODES;
		for (__u32 i = 0; i < TAPIO_MAX_IGNORE_EXIT_CODES; i++) {
			if (i >= n)
				break;
			if (cfg->ignore_exit_codes[i] == code) {
				tapio_metric_inc(CT_METRIC_EXIT_IGNORED);
				return 0;
			}
		}
	}

	__u32 generation = cfg->generation;
	if ((cfg->exit_flags & TAPIO_EXIT_SCOPE_CONTAINERS) && host_task(task, btf)) {
		tapio_metric_inc(CT_METRIC_EXIT_IGNORED);
		return 0; /* a host process: root cgroup in every hierarchy */
	}

	struct container_event *e = TAPIO_RESERVE(&events, struct container_event);
	if (!e)
		return 0;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->config_generation = generation;
	e->event_type = CT_EV_EXIT;
	e->pid = tgid;
	e->tid = (__u32)pid_tgid;
	e->exit_code = code;
	e->signal = sig;
	e->raw_status = status;
	e->flags = fallback;
	if (status & 0x80)
		e->flags |= CT_FLAG_CORE_DUMPED;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (btf)
		fill_task_cgroups_btf(e, task);
	else
		fill_task_cgroups(e, task);
	tapio_submit(&events, e);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int handle_process_exit_btf(struct trace_event_raw_sched_process_exit *ctx)
{
	return process_exit(ctx, 1);
}

SEC("tracepoint/sched/sched_process_exit")
int handle_process_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	return process_exit(ctx, 0);
}
