"""Open, load and attach one CO-RE object; every resource closes on every exit path.

``BpfObject`` is a context manager: leaving the ``with`` block destroys links, then closes the
object (which closes its maps and programs). A load failure raises :class:`BpfError` whose
``verifier_log`` holds the kernel's verifier output, so the reason reaches the operator.
"""

from __future__ import annotations

import collections
import importlib.resources
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from tapio.bpf import libbpf as lb
from tapio.bpf.libbpf import BpfError, check_ptr, check_rc, ffi

log = structlog.get_logger("tapio.bpf")

VERIFIER_LOG_SIZE = 4 * 1024 * 1024

# libbpf's own messages (warnings about CO-RE, missing features) go to structlog, and the last
# few are kept to explain a failure.
_recent_messages: collections.deque[str] = collections.deque(maxlen=64)
_print_cb: Any = None
_LEVELS = {0: "warning", 1: "info", 2: "debug"}


def _install_print_callback() -> None:
    global _print_cb
    if _print_cb is not None:
        return
    lib = lb.lib()
    libc = lb.libc()

    def _cb(level: int, fmt: Any, args: Any) -> int:
        buf = ffi.new("char[]", 2048)
        libc.vsnprintf(buf, 2048, fmt, args)
        text = ffi.string(buf).decode("utf-8", "replace").rstrip()
        if text:
            _recent_messages.append(text)
            if level == 0:
                log.warning("libbpf", message=text)
        return 0

    _print_cb = ffi.callback("int(int, const char *, void *)", _cb)
    lib.libbpf_set_print(_print_cb)


def objects_dir() -> Path:
    """Where the packaged objects live (``tapio/bpf/objects``)."""
    return Path(str(importlib.resources.files("tapio.bpf") / "objects"))


class Map:
    """A map of a loaded object: raw-bytes lookup/update through its fd."""

    def __init__(self, ptr: Any) -> None:
        lib = lb.lib()
        self.name: str = ffi.string(lib.bpf_map__name(ptr)).decode()
        self.fd: int = lib.bpf_map__fd(ptr)
        self.type: int = lib.bpf_map__type(ptr)
        self.key_size: int = lib.bpf_map__key_size(ptr)
        self.value_size: int = lib.bpf_map__value_size(ptr)
        self.max_entries: int = lib.bpf_map__max_entries(ptr)

    def _value_len(self) -> int:
        if self.type == lb.BPF_MAP_TYPE_PERCPU_ARRAY:
            cpus = int(lb.lib().libbpf_num_possible_cpus())
            return ((self.value_size + 7) // 8 * 8) * cpus
        return self.value_size

    def update(self, key: bytes, value: bytes, flags: int = lb.BPF_ANY) -> None:
        if len(key) != self.key_size or len(value) != self.value_size:
            raise ValueError(
                f"map {self.name}: key/value must be {self.key_size}/{self.value_size} bytes, "
                f"got {len(key)}/{len(value)}"
            )
        rc = lb.lib().bpf_map_update_elem(self.fd, key, value, flags)
        check_rc(rc, f"update of map {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        """The raw value (per-CPU maps: every CPU's slot, 8-byte aligned), or None if absent."""
        out = ffi.new("char[]", self._value_len())
        rc = lb.lib().bpf_map_lookup_elem(self.fd, key, out)
        if rc < 0:
            err = lb.last_errno() if rc == -1 else -rc
            if err == 2:  # ENOENT
                return None
            raise BpfError(err, f"lookup in map {self.name}")
        return bytes(ffi.buffer(out))

    def percpu_u64_sum(self, index: int) -> int:
        """Sum over CPUs of a PERCPU_ARRAY of u64 (the metrics map)."""
        raw = self.lookup(index.to_bytes(4, "little"))
        if raw is None:
            return 0
        return sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))


class Program:
    def __init__(self, ptr: Any) -> None:
        lib = lb.lib()
        self.ptr = ptr
        self.name: str = ffi.string(lib.bpf_program__name(ptr)).decode()
        self.section: str = ffi.string(lib.bpf_program__section_name(ptr)).decode()

    @property
    def fd(self) -> int:
        return int(lb.lib().bpf_program__fd(self.ptr))

    def prog_id(self) -> int:
        """The kernel's program id (stable for the program's lifetime; proves no reload)."""
        info = ffi.new("char[]", 256)
        size = ffi.new("uint32_t *", 256)
        check_rc(lb.lib().bpf_obj_get_info_by_fd(self.fd, info, size), f"info of {self.name}")
        return int.from_bytes(bytes(ffi.buffer(info, 8))[4:8], "little")


class BpfObject:
    """One CO-RE object file: ``with BpfObject(path) as obj: obj.attach_all()``."""

    def __init__(self, path: str | os.PathLike[str], *, autoload: set[str] | None = None) -> None:
        self.path = Path(path)
        self._autoload = autoload
        self._obj: Any = None
        self._links: list[Any] = []
        self._log_buf: Any = None
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, Program] = {}
        self.verifier_log = ""

    def __enter__(self) -> BpfObject:
        try:
            self.open_and_load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".o").removesuffix(".bpf")

    def open_and_load(self) -> None:
        lib = lb.lib()
        _install_print_callback()
        if not self.path.is_file():
            raise BpfError(
                2, f"BPF object {self.path} not found", "build it with `python build_bpf.py`"
            )
        self._log_buf = ffi.new("char[]", VERIFIER_LOG_SIZE)
        opts = ffi.new("struct bpf_object_open_opts *")
        opts.sz = ffi.sizeof("struct bpf_object_open_opts")
        opts.kernel_log_buf = self._log_buf
        opts.kernel_log_size = VERIFIER_LOG_SIZE
        opts.kernel_log_level = 0
        _recent_messages.clear()
        self._obj = check_ptr(
            lib.bpf_object__open_file(str(self.path).encode(), opts),
            f"open of BPF object {self.path}",
            "is it a BPF ELF object built by build_bpf.py?",
        )
        prog = lib.bpf_object__next_program(self._obj, ffi.NULL)
        while prog != ffi.NULL:
            p = Program(prog)
            if self._autoload is not None and p.name not in self._autoload:
                lib.bpf_program__set_autoload(prog, False)
            else:
                self.programs[p.name] = p
            prog = lib.bpf_object__next_program(self._obj, prog)
        rc = lib.bpf_object__load(self._obj)
        if rc < 0:
            self.verifier_log = ffi.string(self._log_buf).decode("utf-8", "replace")
            detail = "\n".join(_recent_messages)
            err = BpfError(
                lb.last_errno() if rc == -1 else -rc,
                f"load of {self.path.name} failed",
                "see the verifier log (kernel too old, BTF missing, or a program the verifier "
                "rejects)",
            )
            err.verifier_log = self.verifier_log or detail  # type: ignore[attr-defined]
            raise err
        m = lib.bpf_object__next_map(self._obj, ffi.NULL)
        while m != ffi.NULL:
            mp = Map(m)
            self.maps[mp.name] = mp
            m = lib.bpf_object__next_map(self._obj, m)
        self._log_buf = None

    def attach_all(self) -> None:
        """Attach every loaded program by its section (tracepoint/, tp_btf/, raw_tp/, ...).

        Programs in ``perf_event`` sections are skipped: they need a perf fd per CPU, see
        :meth:`attach_perf_event`.
        """
        for prog in self.programs.values():
            if prog.section.startswith("perf_event"):
                continue
            self.attach(prog.name)

    def attach(self, name: str) -> None:
        prog = self.programs[name]
        link = check_ptr(
            lb.lib().bpf_program__attach(prog.ptr),
            f"attach of {self.name}/{name} ({prog.section})",
            "is tracefs mounted and does this kernel have the tracepoint?",
        )
        self._links.append(link)

    def attach_perf_event(self, name: str, perf_fd: int) -> None:
        """Attach to an opened perf event; the link takes ownership of ``perf_fd``."""
        prog = self.programs[name]
        link = check_ptr(
            lb.lib().bpf_program__attach_perf_event(prog.ptr, perf_fd),
            f"attach of {self.name}/{name} to perf event fd {perf_fd}",
        )
        self._links.append(link)

    def program_ids(self) -> dict[str, int]:
        return {name: p.prog_id() for name, p in self.programs.items()}

    def map(self, name: str) -> Map:
        try:
            return self.maps[name]
        except KeyError:
            raise BpfError(2, f"{self.path.name} has no map {name!r}") from None

    def close(self) -> None:
        lib = lb.lib() if self._obj is not None or self._links else None
        while self._links:
            link = self._links.pop()
            assert lib is not None
            lib.bpf_link__destroy(link)
        if self._obj is not None:
            assert lib is not None
            lib.bpf_object__close(self._obj)
            self._obj = None
        self.maps.clear()
        self.programs.clear()


def iter_objects(directory: Path) -> Iterator[Path]:
    yield from sorted(directory.glob("*.bpf.o"))
