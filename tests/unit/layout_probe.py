"""Ask the C compiler where every field of a BPF header struct lives.

The layout tests compile a tiny program that includes the real header under ``bpf/`` and
prints ``offsetof``/``sizeof`` for each field of the Python mirror, so C and Python can only
agree if they really do. (Event structs are not in the objects' BTF: clang emits BTF only for
types reachable from maps, globals and program signatures.)
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tapio.bpf.abi import CStruct

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

PRELUDE = """
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
/* Minimal stand-ins so observer headers that reference common definitions compile here. */
#ifndef TAPIO_METRIC_OBSERVER_BASE
#define TAPIO_METRIC_OBSERVER_BASE 8
#endif
"""


def c_layout(header: str, struct: CStruct) -> tuple[int, dict[str, tuple[int, int]]]:
    """(sizeof, {field: (offset, size)}) for the non-padding fields of ``struct``."""
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found")
    fields = [name for name, _ in struct.fields if not name.startswith("_")]
    lines = [PRELUDE, f'#include "{header}"', "int main(void) {"]
    lines.append(f'printf("size %zu 0\\n", sizeof(struct {struct.name}));')
    for f in fields:
        lines.append(
            f'printf("{f} %zu %zu\\n", offsetof(struct {struct.name}, {f}), '
            f"sizeof(((struct {struct.name} *)0)->{f}));"
        )
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        exe = Path(tmp) / "probe"
        src.write_text("\n".join(lines))
        subprocess.run([cc, "-I", str(BPF_DIR), "-o", str(exe), str(src)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    size = 0
    layout: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        name, off, sz = line.split()
        if name == "size":
            size = int(off)
        else:
            layout[name] = (int(off), int(sz))
    return size, layout


def assert_layout(header: str, struct: CStruct) -> None:
    size, layout = c_layout(header, struct)
    assert size == struct.size, f"{struct.name}: C size {size} != Python {struct.size}"
    for name, (off, sz) in layout.items():
        assert struct.offsets[name] == off, (
            f"{struct.name}.{name}: C offset {off} != {struct.offsets[name]}"
        )
        assert struct.sizes[name] == sz, (
            f"{struct.name}.{name}: C size {sz} != {struct.sizes[name]}"
        )
