#!/usr/bin/env python3
"""Compile every ``bpf/*.bpf.c`` into a CO-RE object shipped inside the ``tapio`` package.

The objects are built against the kernel types pinned in the repository
(``bpf/vmlinux/<arch>/vmlinux.h``), never against the build host's running kernel: two builds
of one checkout with the same toolchain give byte-identical objects wherever they run (a laptop,
CI, an image build without ``/sys/kernel/btf``). CO-RE relocations, resolved by libbpf against
the *target* kernel's BTF at load time, make the objects load on every kernel >= 5.10 with BTF.

Everything that could leak the build host into an object is pinned: the header, the source paths
(compiled relative to the repository, with the repository directory mapped to ``.`` in the debug
info), the flags, and the environment the compiler sees (locale, ``SOURCE_DATE_EPOCH``).

The same step writes ``src/tapio/bpf/_libbpf_ffi.py``: cffi's out-of-line ABI mode parses the
libbpf declarations of ``tapio/bpf/libbpf_cdef.py`` once, here, into pre-parsed type tables, so
the agent never imports a C parser at start (it is generated, not committed: it belongs to the
cffi release that wrote it).

``--check`` rebuilds into a temporary directory and fails if the packaged objects (or the
generated binding) differ from what the sources produce. ``--gen-vmlinux BTF`` regenerates the
pinned header from a BTF file (done rarely, on purpose, and committed).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "bpf"
OUT = ROOT / "src" / "tapio" / "bpf" / "objects"
VMLINUX = SRC / "vmlinux"
CDEF = ROOT / "src" / "tapio" / "bpf" / "libbpf_cdef.py"
FFI_MODULE = ROOT / "src" / "tapio" / "bpf" / "_libbpf_ffi.py"

# machine name -> (pinned header directory, clang's __TARGET_ARCH_ suffix)
ARCHES = {
    "x86_64": ("x86_64", "x86"),
    "amd64": ("x86_64", "x86"),
    "aarch64": ("aarch64", "arm64"),
    "arm64": ("aarch64", "arm64"),
}


def target_arch() -> tuple[str, str]:
    machine = os.environ.get("TAPIO_BPF_ARCH") or platform.machine()
    try:
        return ARCHES[machine]
    except KeyError:
        sys.exit(f"build_bpf: unsupported architecture {machine!r}")


def pinned_header(arch_dir: str) -> Path:
    """The committed ``vmlinux.h`` for ``arch_dir``; exits with a hint when there is none."""
    header = VMLINUX / arch_dir / "vmlinux.h"
    if not header.is_file():
        sys.exit(
            f"build_bpf: no pinned {header.relative_to(ROOT)}; generate it once from a BTF file "
            f"of that architecture: python build_bpf.py --gen-vmlinux <btf> (and commit it)"
        )
    return header


def generate_vmlinux(btf: Path, arch_dir: str) -> Path:
    """Write ``bpf/vmlinux/<arch>/vmlinux.h`` from ``btf`` with bpftool (an explicit step)."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    header = VMLINUX / arch_dir / "vmlinux.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    tmp = header.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        subprocess.run(
            [bpftool, "btf", "dump", "file", str(btf), "format", "c"], stdout=fh, check=True
        )
    tmp.replace(header)
    return header


def _toolchain_env() -> dict[str, str]:
    """A fixed environment for clang: nothing of the caller's locale, paths or epochs leaks in."""
    keep = {k: os.environ[k] for k in ("PATH",) if k in os.environ}
    return {**keep, "LC_ALL": "C", "TZ": "UTC", "SOURCE_DATE_EPOCH": "0"}


def compile_one(src: Path, out: Path, arch_dir: str, arch: str, clang: str) -> None:
    """Compile one source; paths are given relative to the repository so they do not vary."""
    include = pinned_header(arch_dir).parent
    rel = os.path.relpath
    cmd = [
        clang,
        "-O2",
        "-g",
        "-target",
        "bpf",
        f"-D__TARGET_ARCH_{arch}",
        "-Wall",
        "-Werror",
        "-Wno-unused-function",
        f"-fdebug-prefix-map={ROOT}=.",
        "-fno-ident",
        "-I",
        rel(include, ROOT),
        "-I",
        rel(SRC, ROOT),
        "-c",
        rel(src, ROOT),
        "-o",
        str(out.resolve()),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_toolchain_env())
    # Strip DWARF but keep BTF/.BTF.ext: CO-RE needs BTF, nobody needs line tables at runtime.
    llvm_strip = shutil.which("llvm-strip") or shutil.which("llvm-strip-14")
    if llvm_strip:
        subprocess.run([llvm_strip, "-g", str(out)], check=True, env=_toolchain_env())


def generate_ffi(target: Path) -> Path:
    """Write the out-of-line ABI module of the libbpf binding (pre-parsed cffi type tables)."""
    try:
        import cffi
    except ImportError:
        sys.exit(
            "build_bpf: cffi is needed to generate the libbpf binding; run this with the "
            "environment the package is installed in (pip install -e . first)"
        )
    builder = cffi.FFI()
    builder.cdef(runpy.run_path(str(CDEF))["CDEF"])
    builder.set_source("tapio.bpf._libbpf_ffi", None)
    tmp = target.with_name(target.name + ".tmp")
    builder.emit_python_code(str(tmp))
    tmp.replace(target)
    return target


def build(out_dir: Path) -> list[Path]:
    clang = os.environ.get("CLANG") or shutil.which("clang") or "clang"
    arch_dir, arch = target_arch()
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for src in sorted(SRC.glob("*.bpf.c")):
        out = out_dir / (src.name.removesuffix(".bpf.c") + ".bpf.o")
        compile_one(src, out, arch_dir, arch, clang)
        built.append(out)
    return built


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    parser.add_argument(
        "--btf",
        type=Path,
        default=None,
        help="ignored: the objects build against the pinned bpf/vmlinux/<arch>/vmlinux.h "
        "(kept so older build scripts keep working)",
    )
    parser.add_argument(
        "--gen-vmlinux",
        type=Path,
        metavar="BTF",
        help="regenerate the pinned vmlinux.h of the target architecture from this BTF file",
    )
    parser.add_argument(
        "--check", action="store_true", help="verify the packaged objects match the sources"
    )
    args = parser.parse_args()
    if args.btf is not None:
        print("build_bpf: --btf is ignored; building against the pinned vmlinux.h", file=sys.stderr)
    if args.gen_vmlinux is not None:
        header = generate_vmlinux(args.gen_vmlinux, target_arch()[0])
        print(f"wrote {header.relative_to(ROOT)} ({header.stat().st_size} bytes)")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(Path(tmp))
            stale = [
                p.name
                for p in fresh
                if not (args.out / p.name).exists()
                or not filecmp.cmp(p, args.out / p.name, shallow=False)
            ]
            if CDEF.is_file():
                fresh_ffi = generate_ffi(Path(tmp) / FFI_MODULE.name)
                if not FFI_MODULE.exists() or not filecmp.cmp(fresh_ffi, FFI_MODULE, False):
                    stale.append(str(FFI_MODULE.relative_to(ROOT)))
        if stale:
            print(f"build_bpf: stale objects: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("build_bpf: objects match sources")
        return 0
    for obj in build(args.out):
        print(f"built {obj} ({obj.stat().st_size} bytes)")
    # A copy of bpf/ alone (no package next to it) builds objects only.
    if CDEF.is_file():
        print(f"generated {generate_ffi(FFI_MODULE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
