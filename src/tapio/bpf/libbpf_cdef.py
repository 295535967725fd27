"""The C declarations of the parts of libbpf (>= 1.0) Tapio uses, as in libbpf's headers.

Parsing C at every start costs the agent tens of milliseconds and megabytes of parser tables
(cffi's ``cdef`` runs pycparser), so the declarations are parsed once, at build time:
``build_bpf.py`` feeds this text to cffi's out-of-line ABI mode, which writes the pre-parsed
type tables to ``tapio/bpf/_libbpf_ffi.py``; :mod:`tapio.bpf.libbpf` imports that module and
only dlopens the library at run time. This module holds plain text and imports nothing, so the
build can read it before the package (or the generated module) is importable.
"""

# Long lines kept verbatim from libbpf's headers.
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
