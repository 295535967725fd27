"""The libbpf binding's generated module: current with its declarations, and missing loudly.

build_bpf.py parses ``tapio/bpf/libbpf_cdef.py`` with cffi into ``tapio/bpf/_libbpf_ffi.py``
(out-of-line ABI mode), so the agent imports pre-parsed type tables instead of running a C
parser at every start. A stale module would bind functions with the wrong types; a missing one
must say how to make it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import cffi

from tapio.bpf import libbpf
from tapio.bpf.libbpf_cdef import CDEF

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "src" / "tapio" / "bpf" / "_libbpf_ffi.py"


def _build_bpf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_bpf_for_ffi", REPO / "build_bpf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_module_is_what_the_declarations_produce(tmp_path: Path) -> None:
    fresh = _build_bpf().generate_ffi(tmp_path / "_libbpf_ffi.py")
    assert GENERATED.read_bytes() == fresh.read_bytes(), "run `python build_bpf.py`"


def test_the_generated_types_match_an_inline_parse() -> None:
    inline = cffi.FFI()
    inline.cdef(CDEF)
    for ctype in ("struct bpf_object_open_opts", "struct bpf_insn", "libbpf_print_fn_t"):
        assert libbpf.ffi.sizeof(ctype) == inline.sizeof(ctype), ctype
    opts = libbpf.ffi.new("struct bpf_object_open_opts *")
    assert libbpf.ffi.offsetof("struct bpf_object_open_opts", "kernel_log_level") == (
        inline.offsetof("struct bpf_object_open_opts", "kernel_log_level")
    )
    assert opts.kernel_log_size == 0


def test_a_missing_generated_module_says_how_to_make_it() -> None:
    probe = "import sys; sys.modules['tapio.bpf._libbpf_ffi'] = None; import tapio.bpf.libbpf"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
    )
    assert out.returncode == 1
    assert "ImportError: tapio.bpf._libbpf_ffi is missing" in out.stderr
    assert "python build_bpf.py" in out.stderr
