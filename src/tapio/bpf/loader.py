"""Open, load and attach one CO-RE object; every resource closes on every exit path.

``BpfObject`` is a context manager: leaving the ``with`` block destroys links, then closes the
object (which closes its maps and programs). A load failure raises :class:`BpfError` whose
``verifier_log`` holds the kernel's verifier output, so the reason reaches the operator.
"""

from __future__ import annotations

import collections
import importlib.resources
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import structlog

from tapio.bpf import features
from tapio.bpf import libbpf as lb
from tapio.bpf.features import ProgramSpec
from tapio.bpf.libbpf import BpfError, check_ptr, check_rc, ffi, strerror

log = structlog.get_logger("tapio.bpf")

VERIFIER_LOG_SIZE = 4 * 1024 * 1024

# libbpf's own messages (warnings about CO-RE, missing features) go to structlog, and the last
# few are kept to explain a failure.
_recent_messages: collections.deque[str] = collections.deque(maxlen=64)
_print_cb: Any = None
_LEVELS = {0: "warning", 1: "info", 2: "debug"}
# libbpf names the program or map a load failed on in its messages.
_PROG_RE = re.compile(r"prog '([A-Za-z0-9_]+)'")
_MAP_RE = re.compile(r"map '([A-Za-z0-9_.]+)'")


def _verifier_summary(text: str) -> str:
    """The verifier's last informative line (its statistics lines say nothing about why)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line and not line.startswith(("processed ", "verification time", "stack depth")):
            return line
    return ""


def _last_failure(text: str) -> str:
    for line in reversed(text.splitlines()):
        if "fail" in line or "error" in line.lower():
            return line.strip()
    return ""


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

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there (someone else deleted it first)."""
        rc = lb.lib().bpf_map_delete_elem(self.fd, key)
        if rc < 0 and (lb.last_errno() if rc == -1 else -rc) == 2:  # ENOENT
            return False
        check_rc(rc, f"delete in map {self.name}")
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first for None), or None at the end."""
        out = ffi.new("char[]", self.key_size)
        rc = lb.lib().bpf_map_get_next_key(self.fd, key if key is not None else ffi.NULL, out)
        if rc < 0 and (lb.last_errno() if rc == -1 else -rc) == 2:  # ENOENT
            return None
        check_rc(rc, f"iteration of map {self.name}")
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
    """One CO-RE object file: ``with BpfObject(path) as obj: obj.attach_all()``.

    ``programs`` declares the optional programs (:class:`ProgramSpec`). Before loading, the
    kernel is asked whether each one's hook, helpers and map types exist; a program that cannot
    load is left out and the object is loaded again without it, a program that cannot attach is
    left detached. Either way the reason lands in :attr:`skipped` and the other programs run.
    Programs not declared are required: their failure fails the object, as before.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        autoload: set[str] | None = None,
        programs: Sequence[ProgramSpec] = (),
        map_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.path = Path(path)
        #: map name -> max_entries set before loading (a ring buffer's size in bytes)
        self.map_sizes = dict(map_sizes or {})
        self._autoload = autoload
        self.specs: dict[str, ProgramSpec] = {s.name: s for s in programs}
        self._obj: Any = None
        self._links: list[Any] = []
        self._log_buf: Any = None
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, Program] = {}
        #: optional program -> why it is not running here (not loaded, or loaded but detached)
        self.skipped: dict[str, str] = {}
        #: alternatives of a group that were not needed because another one was loaded
        self.unused: dict[str, str] = {}
        self.attached: set[str] = set()
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

    def _open(self) -> None:
        lib = lb.lib()
        self._log_buf = ffi.new("char[]", VERIFIER_LOG_SIZE)
        opts = ffi.new("struct bpf_object_open_opts *")
        opts.sz = ffi.sizeof("struct bpf_object_open_opts")
        opts.kernel_log_buf = self._log_buf
        opts.kernel_log_size = VERIFIER_LOG_SIZE
        opts.kernel_log_level = 0
        self._obj = check_ptr(
            lib.bpf_object__open_file(str(self.path).encode(), opts),
            f"open of BPF object {self.path}",
            "is it a BPF ELF object built by build_bpf.py?",
        )

    def _iter_list(self, next_of: Callable[[Any, Any], Any]) -> Iterator[Any]:
        """Walk one of the object's libbpf lists: ``next_of(obj, NULL)`` is the first entry,
        ``next_of(obj, entry)`` the one after it, NULL the end."""
        entry = next_of(self._obj, ffi.NULL)
        while entry != ffi.NULL:
            yield entry
            entry = next_of(self._obj, entry)

    def _iter_programs(self) -> Iterator[Any]:
        yield from self._iter_list(lb.lib().bpf_object__next_program)

    def _iter_maps(self) -> Iterator[Any]:
        yield from self._iter_list(lb.lib().bpf_object__next_map)

    def _probe(self) -> dict[str, str]:
        """Why each declared program cannot load here, asked of the kernel before loading."""
        lib = lb.lib()
        unsupported_maps = {
            ffi.string(lib.bpf_map__name(m)).decode(): int(lib.bpf_map__type(m))
            for m in self._iter_maps()
            if features.map_type_supported(int(lib.bpf_map__type(m))) is False
        }
        reasons: dict[str, str] = {}
        with features.KernelBtf() as btf:
            for prog in self._iter_programs():
                p = Program(prog)
                spec = self.specs.get(p.name)
                if spec is None:
                    continue
                if btf.hook_exists(p.section) is False:
                    reasons[p.name] = f"hook {p.section} does not exist on this kernel"
                    continue
                helpers = features.missing_helpers(prog)
                if helpers:
                    ids = ", ".join(str(h) for h in helpers)
                    reasons[p.name] = f"BPF helper(s) {ids} not available to {p.section}"
                    continue
                maps = [m for m in spec.maps if m in unsupported_maps]
                if maps:
                    reasons[p.name] = f"map type of {', '.join(maps)} not supported by this kernel"
        return reasons

    def _plan(self, failed: dict[str, str], present: set[str] | None = None) -> set[str]:
        """The declared programs to leave out; fills ``skipped`` and ``unused``. A declared
        program the object does not contain (an object built before it existed) never takes
        its group's place from an alternative that is there."""
        self.skipped = dict(failed)
        self.unused = {}
        off = set(failed)

        for name, why in features.partners_left_out(self.specs.values(), off, present).items():
            off.add(name)
            self.skipped[name] = why
        chosen: dict[str, str] = {}
        for spec in self.specs.values():
            if spec.name in off or (present is not None and spec.name not in present):
                continue
            if spec.group and spec.group in chosen:
                off.add(spec.name)
                self.unused[spec.name] = f"alternative {chosen[spec.group]} loaded instead"
            elif spec.group:
                chosen[spec.group] = spec.name
        return off

    def open_and_load(self) -> None:
        lib = lb.lib()
        _install_print_callback()
        if not self.path.is_file():
            raise BpfError(
                2, f"BPF object {self.path} not found", "build it with `python build_bpf.py`"
            )
        failed: dict[str, str] = {}
        # One attempt, plus one per optional program that may fail: bounded.
        for _attempt in range(len(self.specs) + 1):
            _recent_messages.clear()
            self._open()
            if _attempt == 0 and self.specs:
                failed.update(self._probe())
                for name, why in failed.items():
                    log.warning(
                        "optional BPF program left out",
                        object=self.path.name,
                        program=name,
                        why=why,
                    )
            present = {Program(prog).name for prog in self._iter_programs()}
            off = self._plan(failed, present)
            self.programs = {}
            for prog in self._iter_programs():
                p = Program(prog)
                if (self._autoload is not None and p.name not in self._autoload) or p.name in off:
                    lib.bpf_program__set_autoload(prog, False)
                else:
                    self.programs[p.name] = p
            for name in [n for n in self.skipped if n not in present]:
                del self.skipped[name]
            idle_maps = {m for s in self.specs.values() if s.name in off for m in s.maps}
            idle_maps -= {m for s in self.specs.values() if s.name not in off for m in s.maps}
            for m in self._iter_maps():
                map_name = ffi.string(lib.bpf_map__name(m)).decode()
                if map_name in idle_maps:
                    lib.bpf_map__set_autocreate(m, False)
                if map_name in self.map_sizes:
                    check_rc(
                        lib.bpf_map__set_max_entries(m, self.map_sizes[map_name]),
                        f"resize of map {map_name} in {self.path.name}",
                    )
            rc = lib.bpf_object__load(self._obj)
            if rc >= 0:
                break
            err_no = lb.last_errno() if rc == -1 else -rc
            self.verifier_log = ffi.string(self._log_buf).decode("utf-8", "replace")
            culprit, why = self._culprit(err_no)
            if culprit is None or culprit in failed:
                self._raise_load_error(err_no)
            failed[culprit] = why
            log.warning(
                "optional BPF program left out", object=self.path.name, program=culprit, why=why
            )
            lib.bpf_object__close(self._obj)
            self._obj = None
        else:  # pragma: no cover - the loop breaks or raises: every retry disables one more
            self._raise_load_error(0)
        for m in self._iter_maps():
            if lib.bpf_map__fd(m) >= 0:
                mp = Map(m)
                self.maps[mp.name] = mp
        self._log_buf = None

    def _culprit(self, err_no: int) -> tuple[str | None, str]:
        """The optional program (or its map) a failed load names, with a one-line reason."""
        text = "\n".join(_recent_messages)
        names = _PROG_RE.findall(text)
        maps = _MAP_RE.findall(text)
        culprit: str | None = None
        for name in reversed(names):
            if name in self.specs and name in self.programs:
                culprit = name
                break
        if culprit is None:
            for m in reversed(maps):
                owners = [s.name for s in self.specs.values() if m in s.maps]
                live = [o for o in owners if o in self.programs]
                if live:
                    culprit = live[0]
                    break
        if culprit is None:
            return None, ""
        detail = _verifier_summary(self.verifier_log) or _last_failure(text) or strerror(err_no)
        return culprit, f"load failed: {detail}"[:240]

    def _raise_load_error(self, err_no: int) -> NoReturn:
        detail = "\n".join(_recent_messages)
        err = BpfError(
            err_no,
            f"load of {self.path.name} failed",
            "see the verifier log (kernel too old, BTF missing, or a program the verifier rejects)",
        )
        err.verifier_log = self.verifier_log or detail  # type: ignore[attr-defined]
        raise err

    def attach_all(self) -> None:
        """Attach every loaded program by its section (tracepoint/, tp_btf/, raw_tp/, ...).

        Programs in ``perf_event`` sections are skipped: they need a perf fd per CPU, see
        :meth:`attach_perf_event`; so are ``cgroup_skb`` ones, which need a cgroup, see
        :meth:`attach_cgroup`. A declared (optional) program that fails to attach is left
        detached and recorded in :attr:`skipped`; a required one raises.
        """
        for prog in self.programs.values():
            if prog.section.startswith(("perf_event", "cgroup_skb")):
                continue
            try:
                self.attach(prog.name)
            except BpfError as exc:
                if prog.name not in self.specs:
                    raise
                self.skipped[prog.name] = f"attach failed: {exc}"[:240]
                log.warning(
                    "optional BPF program not attached",
                    object=self.path.name,
                    program=prog.name,
                    error=str(exc),
                )

    def attach(self, name: str) -> None:
        prog = self.programs[name]
        link = check_ptr(
            lb.lib().bpf_program__attach(prog.ptr),
            f"attach of {self.name}/{name} ({prog.section})",
            "is tracefs mounted and does this kernel have the tracepoint?",
        )
        self._links.append(link)
        self.attached.add(name)

    def unavailable(self) -> dict[str, str]:
        """Capability -> why, for every declared capability none of whose programs runs."""
        running: set[str] = set()
        why: dict[str, list[str]] = {}
        for spec in self.specs.values():
            if spec.name in self.attached:
                running.add(spec.capability)
            elif spec.name in self.skipped:
                why.setdefault(spec.capability, []).append(
                    f"{spec.name}: {self.skipped[spec.name]}"
                )
        return {cap: "; ".join(reasons) for cap, reasons in why.items() if cap not in running}

    def attach_cgroup(self, name: str, cgroup_fd: int) -> None:
        """Attach a cgroup program (a link: other programs on the cgroup are left alone). A
        declared program that fails is recorded in :attr:`skipped`; a required one raises."""
        prog = self.programs[name]
        try:
            link = check_ptr(
                lb.lib().bpf_program__attach_cgroup(prog.ptr, cgroup_fd),
                f"attach of {self.name}/{name} ({prog.section}) to cgroup fd {cgroup_fd}",
            )
        except BpfError as exc:
            if name not in self.specs:
                raise
            self.skipped[name] = f"attach failed: {exc}"[:240]
            log.warning(
                "optional BPF program not attached",
                object=self.path.name,
                program=name,
                error=str(exc),
            )
            return
        self._links.append(link)
        self.attached.add(name)

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
