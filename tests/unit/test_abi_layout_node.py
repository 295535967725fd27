"""The node observer's Python mirrors match bpf/node.h and the BTF clang put into node.bpf.o."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tapio.bpf.abi import CStruct
from tapio.observers.node import RUNQ_HIST, RUNQ_SLOTS, RUNQ_WORST

from .layout_probe import assert_layout

REPO = Path(__file__).resolve().parents[2]
MIRRORS = (RUNQ_HIST, RUNQ_WORST)


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: m.name)
def test_mirror_matches_header(mirror: CStruct) -> None:
    assert_layout("node.h", mirror)


def _btf_size(types: dict[int, dict[str, Any]], type_id: int) -> int:
    t = types[type_id]
    kind = t["kind"]
    if kind in ("INT", "STRUCT", "UNION", "ENUM", "ENUM64", "FLOAT"):
        return int(t["size"])
    if kind == "ARRAY":
        return int(t["nr_elems"]) * _btf_size(types, t["type_id"])
    if kind in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"):
        return _btf_size(types, t["type_id"])
    if kind == "PTR":
        return 8
    raise AssertionError(f"unexpected BTF kind {kind}")


@pytest.fixture(scope="module")
def node_btf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """BTF of node.bpf.o compiled from the current sources (so the test checks the source)."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    clang = shutil.which("clang")
    if not Path(bpftool).exists() or clang is None:
        pytest.skip("bpftool and clang are needed to check the object's BTF")
    spec = importlib.util.spec_from_file_location("build_bpf", REPO / "build_bpf.py")
    assert spec is not None and spec.loader is not None
    build_bpf = importlib.util.module_from_spec(spec)
    sys.modules["build_bpf"] = build_bpf
    spec.loader.exec_module(build_bpf)
    out = tmp_path_factory.mktemp("bpf") / "node.bpf.o"
    arch_dir, arch = build_bpf.target_arch()
    build_bpf.compile_one(REPO / "bpf" / "node.bpf.c", out, arch_dir, arch, clang)
    dump = subprocess.run(
        [bpftool, "btf", "dump", "file", str(out), "-j"], check=True, capture_output=True, text=True
    ).stdout
    raw = json.loads(dump)["types"]
    by_id = {int(t["id"]): t for t in raw}
    structs: dict[str, dict[str, Any]] = {}
    for t in raw:
        if t.get("kind") == "STRUCT" and t.get("name") in {m.name for m in MIRRORS}:
            members = {
                m["name"]: (m["bits_offset"] // 8, _btf_size(by_id, m["type_id"]))
                for m in t["members"]
            }
            structs[t["name"]] = {"size": t["size"], "members": members}
    return structs


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: m.name)
def test_mirror_matches_object_btf(node_btf: dict[str, dict[str, Any]], mirror: CStruct) -> None:
    assert mirror.name in node_btf, f"{mirror.name} missing from node.bpf.o BTF"
    btf = node_btf[mirror.name]
    assert btf["size"] == mirror.size
    names = [n for n, _ in mirror.fields]
    assert list(btf["members"]) == names, "field order/names differ"
    for name, (off, size) in btf["members"].items():
        assert mirror.offsets[name] == off, f"{mirror.name}.{name}: BTF offset {off}"
        assert mirror.sizes[name] == size, f"{mirror.name}.{name}: BTF size {size}"


def test_slot_count_matches_header() -> None:
    text = (REPO / "bpf" / "node.h").read_text()
    assert f"#define RUNQ_SLOTS {RUNQ_SLOTS}" in text
