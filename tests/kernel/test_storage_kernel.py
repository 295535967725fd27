"""Storage observer end to end: real block request errors and real slow requests.

A FUSE filesystem of our own (tests/kernel/fuse_helper.c, compiled here against libfuse3) serves
one file whose reads fail with EIO or sleep at chosen offsets. A read-only loop device on that
file turns them into real block requests: O_DIRECT reads of those sectors give ``error=-5``
completions and slow completions, with the reader as the issuing task.

FUSE safety: a server that stops answering leaves callers in uninterruptible sleep. The helper
exits on its own after a bounded lifetime (a dead server aborts its connection); teardown aborts
the connection through fusectl first, then kills the helper, lazily unmounts and detaches the
loop device — on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tapio.bpf.loader import BpfObject
from tapio.observers.storage import StorageObserver

from .harness import OBJECTS, AgentProcess, kernel_release, require_kernel, run, wait_until

pytestmark = pytest.mark.kernel

HERE = Path(__file__).resolve().parent
IO_ERROR = "kernel.storage.io_error"
LATENCY = "kernel.storage.latency_spike"

MiB = 1 << 20
IMAGE_SIZE = 1024 * MiB  # served by the helper, never stored
BAD_OFF = 16 * MiB  # fails with EIO
SLOW_CRIT_OFF = 32 * MiB  # 300 ms
SLOW_WARN_OFF = 40 * MiB  # 150 ms
AMBIG_OFF = 48 * MiB  # 600 ms, read twice concurrently
FULL_OFF, FULL_LEN = 128 * MiB, 512 * MiB  # 1000 ms: five reads whose keys share a slot set
GOOD_OFF = 8 * MiB
BLOCK = 4096
HELPER_LIFETIME_SECS = 240

CONFIG = """
[thresholds]
io_latency_warning_ns = 100000000
io_latency_critical_ns = 200000000

[agent]
kernel_metrics_interval_secs = 0.5

[metrics]
enabled = true
port = {port}
bind_address = "127.0.0.1"
"""


@dataclass
class FuseLoop:
    loop: str
    major: int
    minor: int
    name: str


def _fusectl() -> Path:
    conns = Path("/sys/fs/fuse/connections")
    if conns.is_dir() and not any(conns.iterdir()):
        run(["mount", "-t", "fusectl", "none", str(conns)], check=False)
    return conns


def _abort_fuse(mnt: Path) -> None:
    """Abort the mount's FUSE connection so no request can sleep on it any more."""
    try:
        dev = os.stat(mnt).st_dev
    except OSError:
        return
    abort = _fusectl() / str(os.minor(dev)) / "abort"
    with contextlib.suppress(OSError):
        abort.write_text("1")


@pytest.fixture(scope="module")
def fuse_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuseLoop]:
    require_kernel(("storage",))
    for tool in ("gcc", "losetup", "pkg-config"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse")
    tmp = tmp_path_factory.mktemp("fuse")
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"], check=False)
    if flags.returncode != 0:
        pytest.skip("libfuse3 development files not installed")
    # The kernel matrix builds the helper on the host (a compiler under emulation is slow).
    exe = Path(os.environ.get("TAPIO_FUSE_HELPER", tmp / "fuse_helper"))
    if not exe.is_file():
        run(
            [
                "gcc",
                "-O2",
                "-Wall",
                "-o",
                str(exe),
                str(HERE / "fuse_helper.c"),
                *flags.stdout.split(),
            ]
        )
    mnt = tmp / "mnt"
    mnt.mkdir()
    bad = f"{BAD_OFF}:{BLOCK}"
    slow = f"{SLOW_CRIT_OFF}:{BLOCK}:300,{SLOW_WARN_OFF}:{BLOCK}:150,{AMBIG_OFF}:{BLOCK}:600,{FULL_OFF}:{FULL_LEN}:1000"
    log = open(tmp / "fuse.log", "wb")  # noqa: SIM115
    helper = subprocess.Popen(
        [str(exe), str(mnt), str(IMAGE_SIZE), bad, slow, str(HELPER_LIFETIME_SECS)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    loop = ""
    try:
        image = mnt / "disk.img"
        if not wait_until(image.exists, 10):
            raise AssertionError(f"FUSE helper did not mount:\n{(tmp / 'fuse.log').read_text()}")
        loop = run(["losetup", "-r", "-f", "--show", str(image)], timeout=20).stdout.strip()
        name = Path(loop).name
        major, minor = (int(x) for x in Path(f"/sys/block/{name}/dev").read_text().split(":"))
        # Let udev/blkid finish probing the new device before the tests read it.
        if shutil.which("udevadm"):
            run(["udevadm", "settle", "-t", "5"], check=False, timeout=10)
        yield FuseLoop(loop, major, minor, name)
    finally:
        _abort_fuse(mnt)
        helper.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            helper.wait(10)
        run(["umount", "-l", str(mnt)], check=False, timeout=20)
        if loop:
            run(["losetup", "-d", loop], check=False, timeout=20)
        log.close()


def _read(dev: str, offset: int) -> subprocess.Popen[bytes]:
    """One O_DIRECT read of one block at ``offset`` by a dd child (comm "dd")."""
    return subprocess.Popen(
        [
            "dd",
            f"if={dev}",
            "of=/dev/null",
            f"bs={BLOCK}",
            f"skip={offset // BLOCK}",
            "count=1",
            "iflag=direct",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(p: subprocess.Popen[bytes]) -> int:
    try:
        return p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        raise


def _mine(proc: AgentProcess, prefix: str, dev: FuseLoop, pid: int) -> list[dict[str, Any]]:
    return [
        o
        for o in proc.occurrences(prefix)
        if o["data"]["pid"] == pid
        and o["data"]["dev_major"] == dev.major
        and o["data"]["dev_minor"] == dev.minor
    ]


@pytest.fixture()
def storage_agent(tmp_path: Path, fuse_loop: FuseLoop) -> Iterator[tuple[AgentProcess, int]]:
    port = 0  # the metrics server binds a free port itself and logs it
    proc = AgentProcess(tmp_path, observers=("storage",), config=CONFIG.format(port=port))
    proc.start()
    try:
        yield proc, port
    finally:
        rc = proc.stop()
        assert rc == 0, f"agent exited {rc}:\n{proc.stderr()[-4000:]}"


def test_read_errors_are_reported_with_the_reader_and_sectors(
    storage_agent: tuple[AgentProcess, int], fuse_loop: FuseLoop
) -> None:
    proc, _ = storage_agent
    bad = _read(fuse_loop.loop, BAD_OFF)
    assert _finish(bad) != 0, "the read of the failing range unexpectedly succeeded"
    good = _read(fuse_loop.loop, GOOD_OFF)
    assert _finish(good) == 0

    hits = wait_until(lambda: _mine(proc, IO_ERROR, fuse_loop, bad.pid), 10)
    assert len(hits) == 1, f"{hits}\n{proc.stderr()[-3000:]}"
    occ = hits[0]
    d = occ["data"]
    assert occ["severity"] == "critical" and occ["outcome"] == "failure"
    assert occ["error"]["code"] == "IO_ERROR"
    assert occ["error"]["message"] == (
        f"I/O error on {fuse_loop.major}:{fuse_loop.minor} (error=-5, read)"
    )
    assert d["error_code"] == -5 and d["error"] == "EIO"
    assert d["sector"] == BAD_OFF // 512
    assert d["nr_sector"] == BLOCK // 512 and d["bytes"] == BLOCK
    assert d["comm"] == "dd" and d["pid_source"] == "issue"
    assert d["device"] == fuse_loop.name
    assert d["opcode"] == "read"
    # Nothing for the good read, and nothing else on this device at all.
    time.sleep(1.0)
    assert _mine(proc, "kernel.storage.", fuse_loop, good.pid) == []
    on_dev = [
        o
        for o in proc.occurrences("kernel.storage.")
        if o["data"]["dev_minor"] == fuse_loop.minor and o["data"]["dev_major"] == fuse_loop.major
    ]
    assert len(on_dev) == 1, on_dev


def test_slow_reads_are_latency_spikes_by_threshold(
    storage_agent: tuple[AgentProcess, int], fuse_loop: FuseLoop
) -> None:
    proc, _ = storage_agent
    crit = _read(fuse_loop.loop, SLOW_CRIT_OFF)
    assert _finish(crit) == 0
    warn = _read(fuse_loop.loop, SLOW_WARN_OFF)
    assert _finish(warn) == 0
    fast = _read(fuse_loop.loop, GOOD_OFF)
    assert _finish(fast) == 0

    crit_hits = wait_until(lambda: _mine(proc, LATENCY, fuse_loop, crit.pid), 10)
    warn_hits = wait_until(lambda: _mine(proc, LATENCY, fuse_loop, warn.pid), 10)
    assert len(crit_hits) == 1, proc.stderr()[-3000:]
    assert len(warn_hits) == 1, proc.stderr()[-3000:]
    c, w = crit_hits[0], warn_hits[0]
    assert c["severity"] == "critical" and c["outcome"] == "in_progress"
    assert w["severity"] == "warning" and w["outcome"] == "in_progress"
    assert c["error"]["code"] == "LATENCY_SPIKE"
    assert 290 <= c["data"]["latency_ms"] < 2000, c["data"]
    assert 140 <= w["data"]["latency_ms"] < 200, w["data"]
    assert c["error"]["message"] == (
        f"I/O latency {c['data']['latency_ms']:.1f}ms on {fuse_loop.major}:{fuse_loop.minor} (read)"
    )
    assert c["data"]["sector"] == SLOW_CRIT_OFF // 512
    assert c["data"]["comm"] == "dd" and c["data"]["error_code"] == 0
    time.sleep(1.0)
    assert _mine(proc, "kernel.storage.", fuse_loop, fast.pid) == []


def _drops(proc: AgentProcess, port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(proc.metrics_text(port)):
        for s in fam.samples:
            if s.name == "tapio_correlation_drops_total" and s.labels.get("observer") == "storage":
                out[s.labels["reason"]] = s.value
    return out


def test_ambiguous_inflight_requests_are_dropped_and_counted(
    storage_agent: tuple[AgentProcess, int], fuse_loop: FuseLoop
) -> None:
    """Two identical reads (same device, sector, size, op) inflight at once: the kernel cannot
    tell which completion belongs to which issuer, so neither is reported; both are counted."""
    proc, port = storage_agent
    before: dict[str, float] = wait_until(lambda: _drops(proc, port) or {"": 0.0}, 5)
    first = _read(fuse_loop.loop, AMBIG_OFF)
    time.sleep(0.15)  # the first request is now held 600 ms by the FUSE server
    second = _read(fuse_loop.loop, AMBIG_OFF)
    assert _finish(first) == 0 and _finish(second) == 0

    def delta(now: dict[str, float], reason: str) -> float:
        return now.get(reason, 0) - before.get(reason, 0)

    def moved() -> dict[str, float] | None:
        # The first completion is dropped as ambiguous; the second then finds no record and
        # is counted as unmatched, not guessed. (The agent polls the counters periodically.)
        now = _drops(proc, port)
        ok = delta(now, "ambiguous_inflight_io") >= 1 and delta(now, "unmatched_completion") >= 1
        return now if ok else None

    after = wait_until(moved, 10)
    assert after, f"drops not counted: {_drops(proc, port)}\n{proc.stderr()[-3000:]}"
    assert delta(after, "ambiguous_inflight_io") == 1
    time.sleep(1.0)
    for p in (first, second):
        assert _mine(proc, "kernel.storage.", fuse_loop, p.pid) == []


def test_the_tp_btf_block_programs_are_the_ones_loaded() -> None:
    """The cheap builds must not fall back silently: the slot table wherever BPF atomics and
    bpf_get_current_task_btf() exist (5.12+); else the LRU map, with the tp_btf completion (every
    supported kernel) and the classic issue tracepoint."""
    require_kernel(("storage",))
    release = kernel_release()
    with BpfObject(OBJECTS / "storage.bpf.o", programs=StorageObserver.programs) as obj:
        obj.attach_all()
        if release >= (5, 12):
            want = {"handle_rq_issue_slot", "handle_rq_complete_slot", "handle_rq_requeue_slot"}
            assert "inflight" not in obj.maps and "io_slots" in obj.maps
        else:
            want = {"handle_rq_issue", "handle_rq_complete_btf", "handle_rq_requeue"}
            assert "io_slots" not in obj.maps and "inflight" in obj.maps
        assert obj.attached == want, obj.skipped


def _slot_set(major: int, minor: int, sector: int, nr_sector: int) -> int:
    """The slot table's set of a read's key, as bpf/storage.bpf.c hashes it (io_set_of)."""
    dev = major << 20 | minor
    h = sector ^ (dev << 32) ^ (nr_sector << 12) ^ 0  # op 0: read
    return ((h * 0x9E3779B97F4A7C15) & (2**64 - 1)) >> (64 - 12)


def test_a_full_slot_set_evicts_its_oldest_request_and_counts_it(
    storage_agent: tuple[AgentProcess, int], fuse_loop: FuseLoop
) -> None:
    """Five slow reads inflight at once whose keys hash to one set of four slots: with the slot
    table (5.12+) the fifth issue takes the oldest's slot, so the first read's completion is
    counted as unmatched and the other four are reported with their own readers and sectors.
    The LRU map (older kernels) has room for all five and reports each."""
    proc, port = storage_agent
    # Non-adjacent one-block reads of the slow range, grouped by the set of their key.
    by_set: dict[int, list[int]] = {}
    for off in range(FULL_OFF, FULL_OFF + FULL_LEN, 2 * BLOCK):
        key_set = _slot_set(fuse_loop.major, fuse_loop.minor, off // 512, BLOCK // 512)
        by_set.setdefault(key_set, []).append(off)
    reads = next((offs[:5] for offs in by_set.values() if len(offs) >= 5), [])
    assert len(reads) == 5, "no set holds five reads of the slow range"

    before = _drops(proc, port).get("unmatched_completion", 0.0)
    procs = []
    for off in reads:  # issued in this order: the first is the oldest
        procs.append(_read(fuse_loop.loop, off))
        time.sleep(0.1)
    for p in procs:
        assert _finish(p) == 0
    release = kernel_release()
    reported = procs[1:] if release >= (5, 12) else procs
    hits = wait_until(
        lambda: (
            got if all(got := [_mine(proc, LATENCY, fuse_loop, p.pid) for p in reported]) else None
        ),
        10,
    )
    assert hits, f"{[_mine(proc, LATENCY, fuse_loop, p.pid) for p in procs]}"
    for p, got in zip(reported, hits, strict=True):
        assert len(got) == 1, got
        d = got[0]["data"]
        assert (d["sector"], d["bytes"], d["comm"]) == (reads[procs.index(p)] // 512, BLOCK, "dd")
        assert got[0]["severity"] == "critical" and d["latency_ms"] >= 1000
    if release >= (5, 12):
        assert _mine(proc, "kernel.storage.", fuse_loop, procs[0].pid) == []
        after = wait_until(
            lambda: n if (n := _drops(proc, port).get("unmatched_completion", 0.0)) > before else 0,
            5,
        )
        assert after - before == 1, (before, after)
