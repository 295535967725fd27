/*
 * A tiny FUSE filesystem for the storage kernel tests: one file, /disk.img, whose reads fail
 * with EIO or are delayed at chosen byte ranges. Backs a read-only loop device so the block
 * layer sees real request errors and real slow requests.
 *
 *   fuse_helper <mountpoint> <size_bytes> <bad ranges> <slow ranges> <lifetime_secs>
 *     bad ranges:  "start:len,start:len" (bytes) or "-"
 *     slow ranges: "start:len:ms,..." or "-"
 *
 * Safety: the process exits by itself after lifetime_secs (SIGALRM), and a dead server aborts
 * its connection, so no caller can sleep uninterruptibly forever. Delays are capped at 2 s.
 * Files are opened with direct_io so the kernel never caches them: every read reaches us.
 */
#define FUSE_USE_VERSION 31
#include <errno.h>
#include <fuse.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_RANGES 16

struct range {
	long long start, len;
	int ms;
};

static long long file_size;
static struct range bad[MAX_RANGES], slow[MAX_RANGES];
static int nbad, nslow;
static const char *NAME = "/disk.img";

static int overlaps(const struct range *r, long long off, long long len)
{
	return off < r->start + r->len && r->start < off + len;
}

static int parse(const char *s, struct range *out, int with_ms)
{
	int n = 0;
	if (!s || strcmp(s, "-") == 0)
		return 0;
	char *dup = strdup(s), *save = NULL;
	for (char *tok = strtok_r(dup, ",", &save); tok && n < MAX_RANGES;
	     tok = strtok_r(NULL, ",", &save)) {
		struct range r = {0, 0, 0};
		if (with_ms)
			sscanf(tok, "%lld:%lld:%d", &r.start, &r.len, &r.ms);
		else
			sscanf(tok, "%lld:%lld", &r.start, &r.len);
		if (r.ms > 2000)
			r.ms = 2000;
		out[n++] = r;
	}
	free(dup);
	return n;
}

static int h_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	(void)fi;
	memset(st, 0, sizeof(*st));
	if (strcmp(path, "/") == 0) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	}
	if (strcmp(path, NAME) == 0) {
		st->st_mode = S_IFREG | 0444;
		st->st_nlink = 1;
		st->st_size = file_size;
		return 0;
	}
	return -ENOENT;
}

static int h_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		     struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)off;
	(void)fi;
	(void)flags;
	if (strcmp(path, "/") != 0)
		return -ENOENT;
	fill(buf, ".", NULL, 0, 0);
	fill(buf, "..", NULL, 0, 0);
	fill(buf, NAME + 1, NULL, 0, 0);
	return 0;
}

static int h_open(const char *path, struct fuse_file_info *fi)
{
	if (strcmp(path, NAME) != 0)
		return -ENOENT;
	if ((fi->flags & O_ACCMODE) != O_RDONLY)
		return -EROFS;
	fi->direct_io = 1;
	return 0;
}

static int h_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)fi;
	if (strcmp(path, NAME) != 0)
		return -ENOENT;
	if (off >= file_size)
		return 0;
	if ((long long)(off + size) > file_size)
		size = file_size - off;
	for (int i = 0; i < nbad; i++)
		if (overlaps(&bad[i], off, size))
			return -EIO;
	for (int i = 0; i < nslow; i++) {
		if (overlaps(&slow[i], off, size)) {
			struct timespec ts = {slow[i].ms / 1000, (slow[i].ms % 1000) * 1000000L};
			nanosleep(&ts, NULL);
			break;
		}
	}
	/* A recognisable pattern: each 8-byte word holds its own offset. */
	for (size_t i = 0; i < size; i++)
		buf[i] = (char)((off + i) >> ((i & 7) * 8));
	return size;
}

static const struct fuse_operations ops = {
	.getattr = h_getattr,
	.readdir = h_readdir,
	.open = h_open,
	.read = h_read,
};

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s mnt size bad slow lifetime\n", argv[0]);
		return 2;
	}
	file_size = atoll(argv[2]);
	nbad = parse(argv[3], bad, 0);
	nslow = parse(argv[4], slow, 1);
	alarm(atoi(argv[5]));
	signal(SIGALRM, SIG_DFL);
	/* foreground, multi-threaded (a slow read must not block the others), no page cache */
	char *fargv[] = {argv[0], "-f", "-o", "ro,default_permissions,allow_other,fsname=tapio-test",
			 argv[1], NULL};
	return fuse_main(5, fargv, &ops, NULL);
}
