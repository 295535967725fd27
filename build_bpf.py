#!/usr/bin/env python3
"""Compile every ``bpf/*.bpf.c`` into a CO-RE object shipped inside the ``tapio`` package.

``vmlinux.h`` is generated from the build host's BTF (``/sys/kernel/btf/vmlinux``) with bpftool;
CO-RE relocations make the resulting objects load on any kernel >= 5.8 with BTF, so the objects
can be built once and installed anywhere. ``--check`` rebuilds into a temporary directory and
fails if the packaged objects differ from what the sources produce.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "bpf"
OUT = ROOT / "src" / "tapio" / "bpf" / "objects"
BUILD = ROOT / "build" / "bpf"

ARCHES = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64", "arm64": "arm64"}


def target_arch() -> str:
    machine = os.environ.get("TAPIO_BPF_ARCH") or platform.machine()
    try:
        return ARCHES[machine]
    except KeyError:
        sys.exit(f"build_bpf: unsupported architecture {machine!r}")


def vmlinux_header(btf: Path) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    header = BUILD / "vmlinux.h"
    if header.exists() and header.stat().st_mtime >= btf.stat().st_mtime:
        return header
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    with open(header.with_suffix(".tmp"), "wb") as fh:
        subprocess.run(
            [bpftool, "btf", "dump", "file", str(btf), "format", "c"], stdout=fh, check=True
        )
    header.with_suffix(".tmp").replace(header)
    return header


def compile_one(src: Path, out: Path, include: Path, arch: str, clang: str) -> None:
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
        "-I",
        str(include),
        "-I",
        str(SRC),
        "-c",
        str(src),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    # Strip DWARF but keep BTF/.BTF.ext: CO-RE needs BTF, nobody needs line tables at runtime.
    llvm_strip = shutil.which("llvm-strip") or shutil.which("llvm-strip-14")
    if llvm_strip:
        subprocess.run([llvm_strip, "-g", str(out)], check=True)


def build(out_dir: Path, btf: Path) -> list[Path]:
    clang = os.environ.get("CLANG") or shutil.which("clang") or "clang"
    arch = target_arch()
    include = vmlinux_header(btf).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for src in sorted(SRC.glob("*.bpf.c")):
        out = out_dir / (src.name.removesuffix(".bpf.c") + ".bpf.o")
        compile_one(src, out, include, arch, clang)
        built.append(out)
    return built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    parser.add_argument("--btf", type=Path, default=Path("/sys/kernel/btf/vmlinux"))
    parser.add_argument(
        "--check", action="store_true", help="verify the packaged objects match the sources"
    )
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(Path(tmp), args.btf)
            stale = [
                p.name
                for p in fresh
                if not (args.out / p.name).exists()
                or not filecmp.cmp(p, args.out / p.name, shallow=False)
            ]
        if stale:
            print(f"build_bpf: stale objects: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("build_bpf: objects match sources")
        return 0
    for obj in build(args.out, args.btf):
        print(f"built {obj.relative_to(ROOT)} ({obj.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
