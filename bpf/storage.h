/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The storage observer's ring-buffer record and its inflight correlation map's key and value.
 * Natural alignment, no implicit padding, sizes multiples of 8. Mirrored in
 * src/tapio/observers/storage.py (STORAGE_EVENT, IO_KEY, IO_VALUE, IO_SET) and asserted field by field
 * against this object's BTF in tests/unit/test_abi_layout_container_storage.py.
 */
#ifndef TAPIO_STORAGE_H
#define TAPIO_STORAGE_H

#define STORAGE_OP_READ  0
#define STORAGE_OP_WRITE 1

#define STORAGE_SEV_WARNING  1
#define STORAGE_SEV_CRITICAL 2

/* observer-specific tapio_metrics indices */
#define STORAGE_METRIC_AMBIGUOUS (TAPIO_METRIC_OBSERVER_BASE + 0) /* two inflight requests, one key */
#define STORAGE_METRIC_UNMATCHED (TAPIO_METRIC_OBSERVER_BASE + 1) /* completion without an issue */

struct storage_event {
	__u64 timestamp_ns;      /*   0: completion time, bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 latency_ns;        /*   8: completion - issue */
	__u64 cgroup_id;         /*  16: issuer's cgroup2 id at issue time */
	__u64 memcg_id;          /*  24: issuer's memory cgroup id at issue time (v1 on hybrid hosts) */
	__u64 sector;            /*  32: first sector (512 bytes) */
	__u32 dev_major;         /*  40: dev >> 20 */
	__u32 dev_minor;         /*  44: dev & 0xfffff */
	__u32 bytes;             /*  48: request size at issue */
	__u32 nr_sector;         /*  52 */
	__u32 config_generation; /*  56 */
	__u32 pid;               /*  60: issuer tgid (issue time) */
	__u32 tid;               /*  64: issuer thread (issue time) */
	__s32 error_code;        /*  68: completion error (negative errno), 0 = ok */
	char rwbs[8];            /*  72: the request's rwbs flags at issue ("R", "WS", "FWS", ...) */
	__u8 opcode;             /*  80: STORAGE_OP_* */
	__u8 severity;           /*  81: STORAGE_SEV_* */
	__u16 _pad0;             /*  82 */
	__u32 _pad1;             /*  84 */
	char comm[16];           /*  88: issuer comm (issue time) */
};                           /* 104 bytes */

struct io_key {
	__u32 dev;        /*  0: dev_t (major << 20 | minor) */
	__u32 nr_sector;  /*  4 */
	__u64 sector;     /*  8 */
	__u8 opcode;      /* 16 */
	__u8 _pad[7];     /* 17 */
};                    /* 24 bytes */

struct io_value {
	__u64 issue_ns;   /*  0 */
	__u64 cgroup_id;  /*  8 */
	__u64 memcg_id;   /* 16 */
	__u32 pid;        /* 24 */
	__u32 tid;        /* 28 */
	__u32 bytes;      /* 32 */
	__u8 ambiguous;   /* 36: a second issue arrived for this key while inflight */
	__u8 requeued;    /* 37: the driver requeued it; its re-issue is the same request */
	__u8 _pad[2];     /* 38 */
	char comm[16];    /* 40 */
	char rwbs[8];     /* 56 */
};                    /* 64 bytes */

/*
 * The slot table of the tp_btf programs on kernels with BPF atomics (5.12+): IO_SLOT_SETS sets
 * of IO_SLOT_WAYS slots, a request's set chosen by a hash of its key. A slot's owner word says
 * who may touch the rest of it: IO_SLOT_FREE, IO_SLOT_BUSY (one program is writing or reading
 * it, having taken it with a compare-and-swap), or the address of the request it holds. A set's
 * owner words and keys come first, so the scan of a set reads one or two cache lines.
 */
#define IO_SLOT_WAYS 4
#define IO_SLOT_SETS_LOG2 12
#define IO_SLOT_SETS (1 << IO_SLOT_SETS_LOG2)
#define IO_SLOT_FREE 0
#define IO_SLOT_BUSY 1

struct io_set {
	__u64 owner[IO_SLOT_WAYS];         /*   0: IO_SLOT_FREE, IO_SLOT_BUSY or a request's address */
	struct io_key key[IO_SLOT_WAYS];   /*  32 */
	struct io_value val[IO_SLOT_WAYS]; /* 128 */
};                                     /* 384 bytes */

#endif /* TAPIO_STORAGE_H */
