"""What the running kernel offers a BPF object, asked before loading it.

Kernels >= 5.10 differ in which hooks exist (tracepoints appear, change shape or get renamed),
which helpers a program type may call and which map types exist. libbpf loads an object all or
nothing, so one program the kernel cannot take would take every other program of the object down
with it. The loader therefore asks first, using libbpf's own feature probes and the kernel's BTF:

* :meth:`KernelBtf.hook_exists` - does the hook a program's section names exist here
  (``tracepoint/<cat>/<name>``: the tracefs event directory; ``tp_btf/<name>`` and
  ``raw_tp/<name>``: the kernel's ``btf_trace_<name>`` typedef);
* :func:`helper_supported` and :func:`map_type_supported` - ``libbpf_probe_bpf_helper`` and
  ``libbpf_probe_bpf_map_type``, cached per process. A "yes" from the helper probe is checked
  once more against the verifier's own words (:func:`load_raw_program`): libbpf before
  1.3 knows only the older refusal messages, so on a kernel that words a refusal the newer way
  (6.12 for the task helpers in ``cgroup_skb``) it would answer "supported", the load would
  fail and the loader would only then fall back to the program's alternative.

A probe that cannot answer (e.g. libbpf does not probe helpers for tracing programs) says
"unknown", and the load itself decides.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapio.bpf import libbpf as lb
from tapio.bpf.libbpf import ffi

TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

BTF_KIND_STRUCT = 4
BTF_KIND_TYPEDEF = 8

# BPF instruction encoding: a helper call is BPF_JMP|BPF_CALL with src_reg 0 and imm = helper id.
_BPF_CALL_OPCODE = 0x85


@dataclass(frozen=True)
class ProgramSpec:
    """What one program of an observer's object is for, so the loader can do without it.

    ``anomalies`` are the anomaly types this program produces; when it cannot load or attach,
    exactly those are reported unsupported (capability ``capability`` unavailable) and the rest
    of the observer runs. Programs of one ``group`` are alternatives for the same facts (e.g. two
    shapes of one tracepoint): the first whose hook exists is loaded, the others are not.
    ``maps`` are maps only this program uses; they are not created when it is not loaded.
    ``needs`` are programs this one only works with (they share a map one writes and another
    reads): when one of them is left out, so is this one, and its group falls back to the next
    alternative, so two halves of different correlations are never loaded together.
    """

    name: str
    capability: str
    anomalies: tuple[str, ...] = ()
    group: str = ""
    maps: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()


def partners_left_out(
    specs: Iterable[ProgramSpec], off: set[str], present: set[str] | None
) -> dict[str, str]:
    """The programs to leave out because one they ``need`` is left out (``off``) or missing
    from the object (not in ``present``), each with why; followed to a fixpoint, so a chain of
    partners goes as a whole."""
    specs = list(specs)
    out: dict[str, str] = {}

    def missing(name: str) -> bool:
        return name in off or name in out or (present is not None and name not in present)

    for _ in range(len(specs)):
        gone = {s.name: n for s in specs if not missing(s.name) for n in s.needs if missing(n)}
        if not gone:
            break
        out.update(
            (name, f"needs {partner}, which is not loaded") for name, partner in gone.items()
        )
    return out


class KernelBtf:
    """The running kernel's BTF for a batch of lookups (libbpf's own search), freed on exit.

    Not cached for the process: the parsed BTF is several MiB, and it is needed only while an
    object is being prepared.
    """

    def __init__(self) -> None:
        self._btf: Any = ffi.NULL

    def __enter__(self) -> KernelBtf:
        ptr = lb.lib().btf__load_vmlinux_btf()
        if ptr != ffi.NULL and int(ffi.cast("intptr_t", ptr)) > 0:
            self._btf = ptr
        return self

    def __exit__(self, *exc: object) -> None:
        if self._btf != ffi.NULL:
            lb.lib().btf__free(self._btf)
            self._btf = ffi.NULL

    def has_type(self, name: str, kind: int) -> bool | None:
        """Whether the kernel's BTF names ``name`` with ``kind``; None when there is no BTF."""
        if self._btf == ffi.NULL:
            return None
        return int(lb.lib().btf__find_by_name_kind(self._btf, name.encode(), kind)) > 0

    def hook_exists(self, section: str) -> bool | None:
        """Whether the hook named by a program's ELF section exists here (None: unknown)."""
        kind, _, rest = section.partition("/")
        if kind in ("tp_btf", "raw_tp", "raw_tracepoint"):
            return self.has_type(f"btf_trace_{rest}", BTF_KIND_TYPEDEF)
        if kind in ("tracepoint", "tp"):
            category, _, event = rest.partition("/")
            for root in TRACEFS_ROOTS:
                events = root / "events"
                if events.is_dir():
                    return (events / category / event).is_dir()
        return None


@functools.cache
def helper_supported(prog_type: int, helper_id: int) -> bool | None:
    """``libbpf_probe_bpf_helper``: True/False, or None where libbpf cannot probe that type.

    A "yes" stands only if the verifier, asked directly, does not refuse the helper either."""
    rc = int(lb.lib().libbpf_probe_bpf_helper(prog_type, helper_id, ffi.NULL))
    if rc < 0:
        return None
    if rc == 1 and _verifier_refuses_helper(prog_type, helper_id):
        return False
    return rc == 1


# The verifier's ways of saying "this program type may not call that helper", old and new.
_REFUSALS = ("invalid func ", "unknown func ", "program of this type cannot use helper ")
_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_INSN_SIZE = 8
_PROBE_LOG_SIZE = 4096
# union bpf_attr for BPF_PROG_LOAD, as far as the log: prog_type, insn_cnt, insns, license,
# log_level, log_size, log_buf.
_PROG_LOAD_ATTR = struct.Struct("=IIQQIIQ")
_PROG_LOAD_ATTR_SIZE = 128  # zero-filled beyond the fields set


def load_raw_program(
    prog_type: int, insns: bytes, *, license: bytes = b"GPL", log_size: int = _PROBE_LOG_SIZE
) -> tuple[int, str]:
    """``bpf(BPF_PROG_LOAD)`` of raw instructions, bypassing libbpf: (fd or -errno, verifier log).

    It exists to ask the verifier directly: libbpf 1.1's helper probe knows only the older
    refusal messages and misreads the newer wording as "supported", so the probe's answer is
    checked against the verifier's own log. ``insns`` are encoded ``struct bpf_insn`` (8 bytes
    each). ``log_size`` 0 loads without a log (log_level 0), else the log is level 1 and may be
    truncated to ``log_size`` bytes. A non-negative fd is the caller's to close. Where ``bpf()``
    cannot be called this way (not x86_64) the answer is ``(-ENOSYS, "")``."""
    if len(insns) % _BPF_INSN_SIZE:
        raise ValueError(f"instructions are {len(insns)} bytes, not a multiple of 8")
    if log_size < 0:
        raise ValueError(f"log_size {log_size} < 0")
    if os.uname().machine != "x86_64":
        return -errno.ENOSYS, ""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(license)
    log = ctypes.create_string_buffer(log_size) if log_size else None
    attr = ctypes.create_string_buffer(_PROG_LOAD_ATTR_SIZE)
    _PROG_LOAD_ATTR.pack_into(
        attr,
        0,
        prog_type,
        len(insns) // _BPF_INSN_SIZE,
        ctypes.addressof(code),
        ctypes.addressof(license_),
        1 if log is not None else 0,
        log_size,
        ctypes.addressof(log) if log is not None else 0,
    )
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, ctypes.sizeof(attr)))
    text = log.value.decode(errors="replace") if log is not None else ""
    return (fd if fd >= 0 else -ctypes.get_errno()), text


def _verifier_refuses_helper(prog_type: int, helper_id: int) -> bool:
    """Load ``call helper; exit`` with a verifier log and look for a refusal of the helper.

    The program is never meant to load (its return value is not checked, a helper's arguments
    are not set up): only which error the verifier reports first matters, and the helper's
    availability is checked before anything else about the call. A failure to even ask (no
    ``bpf()``: not x86_64, or a seccomp filter) is "not refused": the load itself decides then."""
    insns = struct.pack("=BBhiBBhi", _BPF_CALL_OPCODE, 0, 0, helper_id, 0x95, 0, 0, 0)
    fd, log = load_raw_program(prog_type, insns)
    if fd >= 0:
        os.close(fd)
        return False
    return any(r in log for r in _REFUSALS)


@functools.cache
def map_type_supported(map_type: int) -> bool | None:
    """``libbpf_probe_bpf_map_type``: True/False, or None when the probe itself failed."""
    rc = int(lb.lib().libbpf_probe_bpf_map_type(map_type, ffi.NULL))
    if rc < 0:
        return None
    return rc == 1


def helper_ids(prog: Any) -> set[int]:
    """Helper ids a program calls, read from its instructions (before relocation)."""
    lib = lb.lib()
    count = int(lib.bpf_program__insn_cnt(prog))
    insns = lib.bpf_program__insns(prog)
    if insns == ffi.NULL:
        return set()
    out: set[int] = set()
    for i in range(count):
        insn = insns[i]
        if insn.code == _BPF_CALL_OPCODE and insn.src_reg == 0:
            out.add(int(insn.imm))
    return out


def missing_helpers(prog: Any) -> list[int]:
    """Helpers the program calls that the kernel definitely lacks for its program type."""
    prog_type = int(lb.lib().bpf_program__type(prog))
    return sorted(h for h in helper_ids(prog) if helper_supported(prog_type, h) is False)
