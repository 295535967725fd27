"""One program the kernel cannot take turns off only its anomaly type, loudly (real kernel).

The failures are forced with test builds of the shipped objects in which one hook is renamed
(the ELF section that names it, and every copy of that name, patched to a hook no kernel has):
the same thing a kernel without that tracepoint does to the object.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tapio.bpf import features
from tapio.bpf.loader import BpfObject
from tapio.observers import observer_class

from ..ports import closed_port, refuse
from .harness import OBJECTS, AgentProcess, agent, require_kernel, wait_until

RETRANSMIT = (b"tp_btf/tcp_retransmit_skb", b"tp_btf/tcp_retransmit_skX")
REQUEUE = (b"tracepoint/block/block_rq_requeue", b"tracepoint/block/block_rq_requeuX")
REQUEUE_BTF = (b"tp_btf/block_rq_requeue", b"tp_btf/block_rq_requeuX")
OOM = (b"tracepoint/oom/mark_victim", b"tracepoint/oom/mark_victiX")
EXIT = (b"tracepoint/sched/sched_process_exit", b"tracepoint/sched/sched_process_exiX")


pytestmark = pytest.mark.kernel


def _test_build(tmp: Path, name: str, *renames: tuple[bytes, bytes]) -> Path:
    """A directory with every shipped object, ``name``'s hooks renamed as given."""
    out = tmp / "objects"
    out.mkdir(exist_ok=True)
    for src in OBJECTS.glob("*.bpf.o"):
        if not (out / src.name).exists():
            shutil.copy2(src, out / src.name)
    path = out / f"{name}.bpf.o"
    data = path.read_bytes()
    for old, new in renames:
        assert len(old) == len(new) and old in data, old
        data = data.replace(old, new)
    path.write_bytes(data)
    return out


def test_missing_retransmit_hook_only_turns_off_retransmit_spikes(tmp_path: Path) -> None:
    require_kernel(("network",))
    objects = _test_build(tmp_path, "network", RETRANSMIT)
    config = "[metrics]\nenabled = true\nport = 0\n"  # the agent reports the port it bound
    with agent(
        tmp_path, observers=("network",), config=config, extra_args=["--ebpf-dir", str(objects)]
    ) as a:
        # The observer's other anomalies still arrive.
        port = closed_port()
        refuse(port)
        refused = wait_until(
            lambda: [
                o
                for o in a.occurrences("kernel.network.connection_refused")
                if o["data"]["dst_port"] == port
            ],
            20,
        )
        assert refused, a.stderr()[-3000:]
        # The degradation: the capability metric ...
        metrics = a.metrics_text()
        assert re.search(
            r'tapio_observer_capability\{capability="retransmit",observer="network"\} 0\.0',
            metrics,
        ), metrics
        assert re.search(
            r'tapio_observer_capability\{capability="tcp_probe",observer="network"\} 1\.0',
            metrics,
        )
        # ... one log line ...
        lines = [
            rec
            for rec in a.logs()
            if rec.get("event") == "capability unavailable"
            and rec.get("capability") == "retransmit"
        ]
        assert len(lines) == 1, a.stderr()[-3000:]
        assert "tcp_retransmit_skX" in lines[0]["detail"]
        # ... the status file and `tapio health`.
        status_path = a.data_dir / ".tapio-agent-status"
        assert wait_until(status_path.exists, 15), a.stderr()[-2000:]
        status = json.loads(status_path.read_text())["observers"]["network"]
        assert status["state"] == "running"
        assert status["degraded_reasons"] == ["no_retransmit"]
        assert status["capabilities"]["retransmit"] is False
        assert set(status["unsupported"]) == {"kernel.network.retransmit_spike"}
        health = subprocess.run(
            [sys.executable, "-m", "tapio", "health", "--data-dir", str(a.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "network: kernel.network.retransmit_spike unsupported: handle_retransmit" in health
        assert "network: degraded: no_retransmit" in health
        assert "connection_refused unsupported" not in health


def test_a_program_the_load_refuses_is_left_out_and_the_rest_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the hook probe blinded, libbpf itself refuses the program at load; the loader
    reloads the object without it instead of failing the observer."""
    require_kernel(("network",))
    objects = _test_build(tmp_path, "network", RETRANSMIT)
    monkeypatch.setattr(features.KernelBtf, "hook_exists", lambda self, section: None)
    specs = observer_class("network").programs
    with BpfObject(objects / "network.bpf.o", programs=specs) as obj:
        assert "handle_retransmit" not in obj.programs
        assert obj.skipped["handle_retransmit"].startswith("load failed:")
        obj.attach_all()
        assert obj.attached == {"handle_set_state", "handle_receive_reset", "handle_tcp_probe"}
        assert set(obj.unavailable()) == {"retransmit"}
        assert all(pid > 0 for pid in obj.program_ids().values())


def test_a_program_that_cannot_attach_is_left_detached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_kernel(("storage",))
    objects = _test_build(tmp_path, "storage", REQUEUE, REQUEUE_BTF)
    monkeypatch.setattr(features.KernelBtf, "hook_exists", lambda self, section: None)
    with BpfObject(objects / "storage.bpf.o", programs=observer_class("storage").programs) as obj:
        # The slot programs' requeue hook is gone (a tp_btf target is resolved at load), so the
        # whole slot correlation is left out and the LRU one is loaded instead.
        slots = {"handle_rq_issue_slot", "handle_rq_complete_slot", "handle_rq_requeue_slot"}
        assert not slots & set(obj.programs), obj.skipped
        assert "handle_rq_requeue" in obj.programs  # tracepoint programs load without a target
        obj.attach_all()
        # One build of each of the other two hooks (tp_btf, or the classic tracepoint where the
        # kernel refuses that), every loaded program but the requeue one attached.
        assert obj.attached == set(obj.programs) - {"handle_rq_requeue"}
        assert sorted(n.removesuffix("_btf") for n in obj.attached) == [
            "handle_rq_complete",
            "handle_rq_issue",
        ]
        assert obj.skipped["handle_rq_requeue"].startswith("attach failed:")
        # An accuracy aid, not an anomaly type: reported, but io_error/latency_spike stay on.
        assert set(obj.unavailable()) == {"block_rq_requeue"}


def test_an_observer_that_cannot_start_stops_the_agent_unless_allowed(tmp_path: Path) -> None:
    require_kernel(("network", "container"))
    objects = _test_build(tmp_path, "container", OOM, EXIT)
    strict = tmp_path / "strict"
    strict.mkdir()
    a = AgentProcess(
        strict, observers=("network", "container"), extra_args=["--ebpf-dir", str(objects)]
    )
    proc = subprocess.run(a.cmd, cwd=strict, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [
        json.loads(line)
        for line in proc.stderr.splitlines()
        if line.startswith("{") and "could not start" in line
    ]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert set(errors[0]["failed"]) == {"container"}
    assert "no program of container.bpf.o runs" in errors[0]["failed"]["container"]
    assert "agent started" not in proc.stderr

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    extra = ["--ebpf-dir", str(objects), "--allow-missing-observer"]
    with agent(allowed, observers=("network", "container"), extra_args=extra) as b:
        port = closed_port()
        refuse(port)
        assert wait_until(lambda: b.occurrences("kernel.network.connection_refused"), 20)
        status_path = b.data_dir / ".tapio-agent-status"
        assert wait_until(status_path.exists, 15)
        status = json.loads(status_path.read_text())["observers"]
        assert status["container"]["state"] == "failed"
        assert status["network"]["state"] == "running"

    toml = tmp_path / "toml"
    toml.mkdir()
    with agent(
        toml,
        observers=("network", "container"),
        config="[agent]\nallow_degraded = true\n",
        extra_args=["--ebpf-dir", str(objects)],
    ) as c:
        assert any(
            rec.get("event", "").startswith("container observer failed") for rec in c.logs()
        ), c.stderr()[-2000:]


def test_the_helper_probe_takes_the_verifiers_word_over_an_older_libbpf() -> None:
    """libbpf 1.1's helper probe knows only the verifier's older refusal messages: asked about
    ``bpf_override_return`` (never a ``cgroup_skb`` helper) on a kernel that words the refusal
    the newer way, it says "supported". The loader's probe must say no on every kernel, or a
    program calling such a helper (the DNS sender on 6.12) fails its load instead of giving
    way to its alternative beforehand."""
    require_kernel(("network",))
    cgroup_skb, override_return, skb_load_bytes = 8, 58, 26
    assert features.helper_supported(cgroup_skb, override_return) is False
    assert features.helper_supported(cgroup_skb, skb_load_bytes) is True


def test_a_raw_load_hands_back_the_fd_or_the_verifiers_refusal() -> None:
    """``load_raw_program`` is what the helper probe asks the verifier with: a valid program
    loads (an fd, the caller's to close), a refused helper comes back as -EINVAL with the
    verifier's log naming it."""
    require_kernel(("network",))
    cgroup_skb, override_return = 8, 58
    r0_1_exit = struct.pack("=BBhiBBhi", 0xB7, 0, 0, 1, 0x95, 0, 0, 0)
    fd, _ = features.load_raw_program(cgroup_skb, r0_1_exit)
    assert fd >= 0
    os.close(fd)
    call_exit = struct.pack("=BBhiBBhi", 0x85, 0, 0, override_return, 0x95, 0, 0, 0)
    fd, log = features.load_raw_program(cgroup_skb, call_exit)
    assert fd == -errno.EINVAL, log
    assert str(override_return) in log, log
