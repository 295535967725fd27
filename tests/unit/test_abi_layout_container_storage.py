"""The container and storage Python mirrors match the BTF clang emitted into the objects.

Every field's offset and size and the struct's total size are compared with the compiled
object's own BTF (``bpftool btf dump file X.bpf.o -j``), so the test checks what the kernel
really writes. The objects are built first when missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tapio.bpf.abi import CStruct
from tapio.observers.container import CONTAINER_EVENT
from tapio.observers.storage import IO_KEY, IO_SET, IO_VALUE, STORAGE_EVENT

REPO = Path(__file__).resolve().parents[2]
OBJECTS = REPO / "src" / "tapio" / "bpf" / "objects"

pytestmark = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")


@cache
def btf_types(obj_name: str) -> dict[str, dict[str, Any]]:
    obj = OBJECTS / f"{obj_name}.bpf.o"
    src = REPO / "bpf" / f"{obj_name}.bpf.c"
    if not obj.exists() or obj.stat().st_mtime < src.stat().st_mtime:
        if shutil.which("clang") is None:
            pytest.skip("clang not installed: cannot build the BPF objects")
        subprocess.run([sys.executable, str(REPO / "build_bpf.py")], check=True, cwd=REPO)
    dump = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(obj), "-j"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types = json.loads(dump)["types"]
    by_id = {t["id"]: t for t in types}
    out: dict[str, dict[str, Any]] = {}
    for t in types:
        if t.get("kind") == "STRUCT" and t.get("name"):
            t = dict(t)
            t["_by_id"] = by_id
            out[t["name"]] = t
    return out


def _type_size(by_id: dict[int, dict[str, Any]], type_id: int) -> int:
    t = by_id[type_id]
    kind = t["kind"]
    if kind in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"):
        return _type_size(by_id, t["type_id"])
    if kind == "ARRAY":
        return int(t["nr_elems"]) * _type_size(by_id, t["type_id"])
    return int(t["size"])


def assert_matches_btf(obj_name: str, layout: CStruct) -> None:
    types = btf_types(obj_name)
    assert layout.name in types, f"{obj_name}.bpf.o has no BTF for struct {layout.name}"
    t = types[layout.name]
    by_id = t["_by_id"]
    assert t["size"] == layout.size, f"{layout.name}: BTF size {t['size']} != {layout.size}"
    btf_fields = {m["name"]: m for m in t["members"]}
    py_fields = [name for name, _ in layout.fields]
    assert py_fields == [m["name"] for m in t["members"]], "field names or order differ"
    for name in py_fields:
        m = btf_fields[name]
        assert m["bits_offset"] % 8 == 0, f"{layout.name}.{name} is a bitfield"
        assert layout.offsets[name] == m["bits_offset"] // 8, f"{layout.name}.{name} offset"
        assert layout.sizes[name] == _type_size(by_id, m["type_id"]), f"{layout.name}.{name} size"


def test_container_event_matches_btf() -> None:
    assert_matches_btf("container", CONTAINER_EVENT)
    assert CONTAINER_EVENT.size % 8 == 0


@pytest.mark.parametrize("layout", [STORAGE_EVENT, IO_KEY, IO_VALUE, IO_SET], ids=lambda s: s.name)
def test_storage_structs_match_btf(layout: CStruct) -> None:
    assert_matches_btf("storage", layout)
    assert layout.size % 8 == 0


def test_a_wrong_mirror_is_caught() -> None:
    """The comparison itself can fail: a mirror with two fields swapped is rejected."""
    fields = list(CONTAINER_EVENT.fields)
    fields[1], fields[2] = fields[2], fields[1]
    swapped = CStruct("container_event", fields, CONTAINER_EVENT.size)
    with pytest.raises(AssertionError):
        assert_matches_btf("container", swapped)
