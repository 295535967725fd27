"""cffi ABI-mode declarations for the parts of libbpf (>= 1.0, ``libbpf.so.1``) Tapio uses.

ABI mode (dlopen) keeps the installed package pure Python: a node needs only the runtime
``libbpf1`` package, no compiler and no headers. libbpf 1.x reports failures as NULL/negative
returns with ``errno`` set; :func:`check_ptr` and :func:`check_rc` turn them into
:class:`BpfError` with the errno and libbpf's own text.
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import Any

import cffi

# C declarations as in libbpf's headers (long lines kept verbatim).
CDEF = """
struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;

struct bpf_object_open_opts {
    size_t sz;
    const char *object_name;
    bool relaxed_maps;
    const char *pin_root_path;
    uint32_t _stub_attach_prog_fd;
    const char *kconfig;
    const char *btf_custom_path;
    char *kernel_log_buf;
    size_t kernel_log_size;
    uint32_t kernel_log_level;
};

struct bpf_object *bpf_object__open_file(const char *path, const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                             struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                     const char *name);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
bool bpf_program__autoload(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach_perf_event(const struct bpf_program *prog, int pfd);
struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);
int bpf_link__destroy(struct bpf_link *link);
int bpf_link__fd(const struct bpf_link *link);

int bpf_map__fd(const struct bpf_map *map);
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
uint32_t bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
uint32_t bpf_map__key_size(const struct bpf_map *map);
uint32_t bpf_map__value_size(const struct bpf_map *map);

int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);

struct bpf_insn {
    uint8_t code;
    uint8_t dst_reg:4;
    uint8_t src_reg:4;
    int16_t off;
    int32_t imm;
};
struct btf;

const struct bpf_insn *bpf_program__insns(const struct bpf_program *prog);
size_t bpf_program__insn_cnt(const struct bpf_program *prog);
int bpf_program__type(const struct bpf_program *prog);
int bpf_map__set_autocreate(struct bpf_map *map, bool autocreate);

int libbpf_probe_bpf_helper(int prog_type, int helper_id, const void *opts);
int libbpf_probe_bpf_map_type(int map_type, const void *opts);
struct btf *btf__load_vmlinux_btf(void);
int btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
void btf__free(struct btf *btf);

int libbpf_num_possible_cpus(void);
int libbpf_strerror(int err, char *buf, size_t size);

typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *args);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
int vsnprintf(char *str, size_t size, const char *format, void *ap);
"""

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_RINGBUF = 27

# cffi objects are dynamically typed; keep them Any at the boundary.
ffi: Any = cffi.FFI()
ffi.cdef(CDEF)

_lib: Any = None
_libc: Any = None


class BpfError(OSError):
    """A libbpf or bpf() failure, with errno and a message a person can act on."""

    def __init__(self, err: int, what: str, hint: str = "") -> None:
        err = abs(err) or errno_mod.EINVAL
        detail = strerror(err)
        message = f"{what}: {detail} (errno {err})"
        if hint:
            message = f"{message}; {hint}"
        super().__init__(err, message)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return str(self.args[1])


def lib() -> Any:
    """The dlopen'ed libbpf; raises BpfError(ENOENT) with an install hint if it is missing."""
    global _lib, _libc
    if _lib is None:
        try:
            _lib = ffi.dlopen(os.environ.get("TAPIO_LIBBPF", "libbpf.so.1"))
        except OSError as exc:
            raise BpfError(
                errno_mod.ENOENT,
                "cannot load libbpf.so.1",
                "install the runtime library (Debian/Ubuntu: apt-get install libbpf1)",
            ) from exc
        _libc = ffi.dlopen(None)
    return _lib


def libc() -> Any:
    lib()
    return _libc


def strerror(err: int) -> str:
    if _lib is None:
        return os.strerror(err)
    buf = ffi.new("char[]", 256)
    if _lib.libbpf_strerror(err, buf, 256) == 0:
        return str(ffi.string(buf).decode("utf-8", "replace"))
    return os.strerror(err)


def last_errno() -> int:
    return ffi.errno or errno_mod.EINVAL


def check_ptr(ptr: Any, what: str, hint: str = "") -> Any:
    if ptr == ffi.NULL:
        raise BpfError(last_errno(), what, hint)
    return ptr


def check_rc(rc: int, what: str, hint: str = "") -> int:
    if rc < 0:
        raise BpfError(-rc if rc != -1 else last_errno(), what, hint)
    return rc


def release_heap() -> None:
    """Give the C heap that loading left free back to the kernel (glibc's ``malloc_trim``).

    Start-up frees megabytes of C heap (libbpf parses the kernel's BTF for every object it
    loads and frees it after the load) that glibc keeps mapped: without this the idle agent's
    RSS carried about 4.5 MiB of it for its whole life. Not glibc: nothing to do.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
