"""The Python mirrors of the kernel ABI match the C headers byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tapio.bpf.abi import CONFIG_SIZE, INERT_CONFIG, TAPIO_CONFIG, CStruct, TapioConfig
from tapio.observers.network import NETWORK_EVENT

from .layout_probe import assert_layout

OBJECTS = Path(__file__).resolve().parents[2] / "src" / "tapio" / "bpf" / "objects"


def test_tapio_config_layout_matches_header() -> None:
    assert_layout("tapio_config.h", TAPIO_CONFIG)
    assert TAPIO_CONFIG.size == CONFIG_SIZE == 256


def test_network_event_layout_matches_header() -> None:
    assert_layout("network.h", NETWORK_EVENT)
    assert NETWORK_EVENT.size == 144
    # The connecting task's cgroup ids follow comm; earlier offsets did not move.
    assert NETWORK_EVENT.offsets["comm"] == 104
    assert NETWORK_EVENT.offsets["cgroup_id"] == 120
    assert NETWORK_EVENT.offsets["memcg_id"] == 128
    assert NETWORK_EVENT.offsets["cpu_cgroup_id"] == 136
    assert NETWORK_EVENT.sizes["cgroup_id"] == NETWORK_EVENT.sizes["cpu_cgroup_id"] == 8


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")
def test_tapio_config_in_every_object_btf_matches_python() -> None:
    objects = sorted(OBJECTS.glob("*.bpf.o"))
    if not objects:
        pytest.skip("objects not built")
    for obj in objects:
        dump = subprocess.run(
            ["bpftool", "btf", "dump", "file", str(obj), "-j"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        types = json.loads(dump)["types"]
        cfg = [t for t in types if t.get("kind") == "STRUCT" and t.get("name") == "tapio_config"]
        assert cfg, f"{obj.name} has no tapio_config carrier"
        assert cfg[0]["size"] == CONFIG_SIZE
        for member in cfg[0]["members"]:
            name = member["name"]
            if name.startswith("_"):
                continue
            assert TAPIO_CONFIG.offsets[name] == member["bits_offset"] // 8, (obj.name, name)


def test_zero_config_is_inert_and_pack_is_exact() -> None:
    assert bytes(256) == INERT_CONFIG
    packed = TapioConfig(generation=7, flags=1, ignore_exit_codes=(1, 2)).pack()
    assert len(packed) == 256
    fields = TAPIO_CONFIG.struct.unpack(packed)
    assert fields[TAPIO_CONFIG.index["abi_version"]] == 4
    assert fields[TAPIO_CONFIG.index["generation"]] == 7
    assert fields[TAPIO_CONFIG.index["ignore_exit_count"]] == 2
    assert packed[152:] == bytes(104)


def test_pack_clamps_to_c_types() -> None:
    packed = TapioConfig(rtt_spike_multiplier=2**40, generation=-5).pack()
    fields = TAPIO_CONFIG.struct.unpack(packed)
    assert fields[TAPIO_CONFIG.index["rtt_spike_multiplier"]] == 0xFFFFFFFF
    assert fields[TAPIO_CONFIG.index["generation"]] == 0


def test_more_than_16_ignore_codes_truncate() -> None:
    packed = TapioConfig(ignore_exit_codes=tuple(range(32))).pack()
    fields = TAPIO_CONFIG.struct.unpack(packed)
    assert fields[TAPIO_CONFIG.index["ignore_exit_count"]] == 16


def test_field_table_is_the_pair_list_and_rejects_a_malformed_line() -> None:
    table = CStruct("t", "\n    a  Q\n\n    _p 4x\n    b  I\n", 16)
    assert table.fields == (("a", "Q"), ("_p", "4x"), ("b", "I"))
    assert table.offsets == CStruct("t", [("a", "Q"), ("_p", "4x"), ("b", "I")], 16).offsets
    with pytest.raises(ValueError, match="'a Q x' is not 'name format'"):
        CStruct("t", "a Q x\n", 8)
