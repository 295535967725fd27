"""Memory pressure on demand, for the node observer's end-to-end test.

The node observer reports memory pressure from a cgroup2 directory's ``memory.pressure`` (PSI
``some``/``full`` avg10 against its thresholds), so the load has to make the kernel account
memory stalls to one cgroup for several of its 10 s averaging windows. Two sources, chosen from
the layout the observer itself sees (:func:`mode`):

* ``high`` -- the memory controller lives in the cgroup2 tree the observer reads PSI from (pure
  cgroup v2, every Kubernetes node). An anonymous-memory allocator runs in the cgroup with
  ``memory.high`` below its working set and no swap: every charge above ``memory.high`` sends
  the allocating task into reclaim that cannot free anonymous pages and then into the kernel's
  over-high throttle sleep, and both count as memory stall. The cgroup's PSI climbs towards
  100 % within seconds and stays there, on any CPU speed and any backing store. A hard
  ``memory.max`` well above the allocator's bounded working set keeps the OOM killer out.
* ``limit`` -- a hybrid host: the memory controller is v1 (no ``memory.high``), PSI comes from
  the controller-less cgroup2 tree. The same process sits in a v1 cgroup with a memory limit and
  in a cgroup2 directory for PSI, and thrashes the page cache of a file on a block-backed file
  system larger than the limit: every miss reclaims (direct reclaim is memory stall) and
  refaults of workingset pages wait for the disk. Anonymous memory cannot be used there: at a
  v1 limit without swap it is not throttled but OOM-killed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tapio.observers.cgroups.roots import CgroupRoots, discover_roots

MIB = 1 << 20

# -- high: anonymous memory above memory.high ---------------------------------------------------
HIGH_MIB = 32  # memory.high: below the allocator's working set
ALLOC_MIB = 64  # anonymous chunks the allocator holds at most (plus the interpreter's own ~10)
HARD_MAX_MIB = 160  # memory.max: far above everything the allocator can hold, so no OOM
ALLOC_CHUNK_MIB = 1

# Maps and touches 1 MiB anonymous chunks until ALLOC_MIB are held, then keeps replacing the
# oldest one, so it charges new pages for as long as it runs: above memory.high each batch of
# charged pages is reclaimed for (in vain: no swap) and throttled. Bounded in time and memory.
ALLOC = r"""
import mmap, sys, time
secs, hold_mib, chunk_mib = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + secs
fill = b"\x5a" * (chunk_mib << 20)
held = []
while time.monotonic() < end:
    if len(held) * chunk_mib >= hold_mib:
        held.pop(0).close()
    m = mmap.mmap(-1, len(fill), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(fill)
    held.append(m)
"""

# -- limit: page-cache thrash under a v1 limit ------------------------------------------------
# On a block-backed file system (a tmpfs would keep the pages unreclaimable).
THRASH_FILE = Path(os.environ.get("TAPIO_TEST_SCRATCH", "/var/tmp")) / "tapio-node-thrash.bin"
THRASH_FILE_MIB = 256
THRASH_REGION_MIB = 64  # re-read region: 1.33x the limit keeps refaults in the workingset
LIMIT_MIB = 48

# 8 threads of random 4 KiB preads (released GIL) over a region larger than the memcg limit:
# every miss charges a page (direct reclaim) and refaults of workingset pages stall in I/O. The
# cache of the whole file is dropped first so the pages are charged to this cgroup.
THRASH = r"""
import os, random, sys, threading, time
path, secs, mib = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + secs
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
pages = (mib << 20) // 4096
def worker():
    r = random.Random()
    while time.monotonic() < end:
        for _ in range(64):
            os.pread(fd, 4096, r.randrange(pages) * 4096)
ts = [threading.Thread(target=worker) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
"""


def mode(roots: CgroupRoots | None = None) -> str:
    """``high`` when the memory controller is in the cgroup2 tree the node observer reads PSI
    from, ``limit`` when it is a v1 hierarchy beside it; ``""`` when there is neither."""
    r = roots if roots is not None else discover_roots()
    if r.unified is None or r.memory is None:
        return ""
    return "high" if r.memory == r.unified else "limit"


def set_memory_high(d: Path) -> None:
    """``memory.high`` below the allocator's working set, ``memory.max`` far above it, and no
    swap (where swap is accounted), so the allocator is throttled and never OOM-killed."""
    (d / "memory.max").write_text(str(HARD_MAX_MIB * MIB))
    (d / "memory.high").write_text(str(HIGH_MIB * MIB))
    if (d / "memory.swap.max").exists():
        (d / "memory.swap.max").write_text("0")


def high_events(d: Path) -> dict[str, int]:
    """cgroup2 ``memory.events``: ``high`` (charges over memory.high, i.e. throttled), ``max``
    (charges that hit memory.max) and ``oom_kill``."""
    ev = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
    return {k: int(ev.get(k, 0)) for k in ("high", "max", "oom", "oom_kill")}


def alloc_argv(python: str, secs: float) -> list[str]:
    return [python, "-c", ALLOC, str(round(secs)), str(ALLOC_MIB), str(ALLOC_CHUNK_MIB)]


def thrash_argv(python: str, secs: float) -> list[str]:
    return [python, "-c", THRASH, str(thrash_file()), str(round(secs)), str(THRASH_REGION_MIB)]


def thrash_file() -> Path:
    """The file the thrasher reads (written once, fsynced, reused while it has the right size)."""
    if THRASH_FILE.exists() and THRASH_FILE.stat().st_size == THRASH_FILE_MIB * MIB:
        return THRASH_FILE
    chunk = os.urandom(MIB)
    try:
        with open(THRASH_FILE, "wb") as fh:
            for _ in range(THRASH_FILE_MIB):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            THRASH_FILE.unlink()
        raise
    return THRASH_FILE
