"""Two builds of the BPF objects on differently configured "hosts" give byte-identical objects.

The hosts differ in what used to leak into an object: the checkout's location, the working
directory, the locale and time zone, a BTF file offered on the command line, and a bpftool on
PATH (the build must not call it: the objects compile against the pinned vmlinux.h, never
against the build host's kernel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OBJECTS = ("container", "network", "node", "storage")


def _checkout(root: Path) -> Path:
    """A copy of what the build reads (build_bpf.py and bpf/) at ``root``."""
    root.mkdir(parents=True)
    shutil.copy2(REPO / "build_bpf.py", root / "build_bpf.py")
    shutil.copytree(REPO / "bpf", root / "bpf")
    return root


def _build(
    checkout: Path, out: Path, cwd: Path, env: dict[str, str], extra: tuple[str, ...] = ()
) -> None:
    subprocess.run(
        [sys.executable, str(checkout / "build_bpf.py"), "--out", str(out), *extra],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is needed to build the objects")
def test_two_differently_configured_builds_are_byte_identical(tmp_path: Path) -> None:
    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "elsewhere" / "a-much-longer" / "checkout-path")
    # Host B: a bpftool that records being called, a foreign BTF file, another locale and zone.
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    called = tmp_path / "bpftool-was-called"
    (fake_bin / "bpftool").write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    (fake_bin / "bpftool").chmod(0o755)
    foreign_btf = tmp_path / "foreign.btf"
    foreign_btf.write_bytes(b"\x9f\xeb\x01\x00not a real BTF")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env_a = {**base, "LC_ALL": "C", "TZ": "UTC"}
    env_b = {
        **base,
        "PATH": f"{fake_bin}:{base['PATH']}",
        "LANG": "de_DE.UTF-8",
        "TZ": "Asia/Tokyo",
        "SOURCE_DATE_EPOCH": "1234567890",
        "CFLAGS": "-O0 -DNOT_USED",
    }
    out_a, out_b = tmp_path / "out-a", tmp_path / "objects-b"
    _build(a, out_a, cwd=a, env=env_a)
    _build(b, out_b, cwd=tmp_path, env=env_b, extra=("--btf", str(foreign_btf)))

    assert not called.exists(), "build_bpf.py ran bpftool: it must compile against the pin"
    for name in OBJECTS:
        first = (out_a / f"{name}.bpf.o").read_bytes()
        second = (out_b / f"{name}.bpf.o").read_bytes()
        assert first[:4] == b"\x7fELF"
        assert first == second, f"{name}.bpf.o differs between the two builds"
        assert str(tmp_path).encode() not in first, f"{name}.bpf.o embeds the checkout's path"


def test_pinned_header_is_committed_and_used() -> None:
    header = REPO / "bpf" / "vmlinux" / "x86_64" / "vmlinux.h"
    assert header.is_file()
    text = header.read_text()
    assert "#ifndef __VMLINUX_H__" in text
    # The kernel types the objects rely on, present in the pin.
    for needle in (
        "struct trace_event_raw_tcp_retransmit_skb {",
        "typedef void (*btf_trace_tcp_retransmit_skb)",
        "struct trace_event_raw_block_rq_completion {",
        "struct sched_info {",
    ):
        assert needle in text, needle
    source = (REPO / "build_bpf.py").read_text()
    assert "/sys/kernel/btf/vmlinux" not in source
