/*
 * Benchmark-only: drive the pinned synthetic producer at a steady rate with BPF_PROG_TEST_RUN.
 *
 *   runner <pinned prog> <records/s> <seconds> <generation>
 *
 * Every 5 ms it runs the program once per MAX_PER_RUN records owed (one run writes `count`
 * records in a loop inside the program), spreading the rate evenly; prints the number of runs done and the seconds taken. Records carry the
 * runner's own pid. No libbpf: two bpf() commands.
 */
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct params {
	uint32_t pid, tid, generation;
	uint16_t port_base, dport;
	uint32_t count;
};

#define MAX_PER_RUN 65536 /* as in producer.bpf.c */

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: runner PROG RATE SECONDS GENERATION\n");
		return 2;
	}
	union bpf_attr attr;
	memset(&attr, 0, sizeof(attr));
	attr.pathname = (uint64_t)(uintptr_t)argv[1];
	int fd = sys_bpf(BPF_OBJ_GET, &attr);
	if (fd < 0) {
		perror("BPF_OBJ_GET");
		return 1;
	}
	double rate = atof(argv[2]), secs = atof(argv[3]);
	unsigned char pkt[64] = {0};
	struct params p = {.pid = (uint32_t)getpid(), .tid = (uint32_t)getpid(),
			   .generation = (uint32_t)atol(argv[4]), .port_base = 20000, .dport = 9};
	memcpy(pkt, &p, sizeof(p));
	const double tick = 0.005;
	double start = now(), owed = 0;
	long done = 0;
	for (long i = 1;; i++) {
		double t = start + i * tick;
		if (t > start + secs)
			break;
		owed += rate * tick;
		long want = (long)owed;
		owed -= want;
		while (want > 0) {
			p.count = want > MAX_PER_RUN ? MAX_PER_RUN : (uint32_t)want;
			memcpy(pkt, &p, sizeof(p));
			memset(&attr, 0, sizeof(attr));
			attr.test.prog_fd = fd;
			attr.test.data_in = (uint64_t)(uintptr_t)pkt;
			attr.test.data_size_in = sizeof(pkt);
			attr.test.repeat = 1;
			if (sys_bpf(BPF_PROG_TEST_RUN, &attr) < 0) {
				perror("BPF_PROG_TEST_RUN");
				return 1;
			}
			done += p.count;
			want -= p.count;
		}
		double left = t - now();
		if (left > 0) {
			struct timespec s = {(time_t)left, (long)((left - (time_t)left) * 1e9)};
			nanosleep(&s, NULL);
		}
	}
	printf("%ld %.3f\n", done, now() - start);
	return 0;
}
