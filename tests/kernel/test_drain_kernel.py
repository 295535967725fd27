"""The drainer parks when the rings are quiet, and a record wakes it at once.

The real agent with the network observer: after a quiet spell every object's ``tapio_wake``
flag is set (read back with bpftool), and a refused connect is then delivered well before the
parked drainer's 1 s safety pass would have found it. (That the flags are cleared on waking is
the unit tests' part: here the agent parks again a second later, less than a bpftool call takes
in an emulated guest.)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from ..ports import closed_port, refuse
from .harness import TIME_SCALE, agent, require_kernel, wait_until


def held_map_ids(pid: int) -> set[int]:
    """The ids of the BPF maps process ``pid`` holds an fd of (its fdinfo says ``map_id``)."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:  # the fd was closed meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("map_id:"):
                ids.add(int(line.split()[1]))
    return ids


def wake_flags(pid: int) -> list[int]:
    """The values of the ``tapio_wake`` maps that process ``pid`` holds."""
    shown = subprocess.run(
        ["bpftool", "-j", "map", "show"], check=True, capture_output=True, text=True
    )
    held = held_map_ids(pid)
    values = []
    for m in json.loads(shown.stdout or "[]"):
        if m.get("name") != "tapio_wake" or m["id"] not in held:
            continue
        out = subprocess.run(
            ["bpftool", "-j", "map", "lookup", "id", str(m["id"]), "key", "0", "0", "0", "0"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        values.append(int(json.loads(out)["formatted"]["value"]))
    return values


def test_a_parked_agent_is_woken_by_the_first_record(tmp_path: Path) -> None:
    require_kernel()
    port = closed_port()
    with agent(tmp_path) as a:
        assert a.proc is not None
        pid = a.proc.pid
        latencies = []
        for _ in range(3):
            # quiet for a while: the drainer parks (other work on the machine may delay it)
            parked = wait_until(lambda: (f := wake_flags(pid)) and all(f), 15, interval=0.1)
            assert parked, f"the drainer did not park: {wake_flags(pid)}"
            before = len(a.occurrences("kernel.network.connection_refused"))
            t0 = time.monotonic()
            refuse(port)

            def arrived(n: int = before) -> bool:
                return len(a.occurrences("kernel.network.connection_refused")) > n

            assert wait_until(arrived, 5, interval=0.01), a.stderr()[-2000:]
            latencies.append(time.monotonic() - t0)
        # A wakeup that did not arrive would leave the record to the 1 s safety pass: three
        # such waits all under 0.4 s would be a 6 % chance; a woken agent takes milliseconds.
        assert max(latencies) < 0.4 * TIME_SCALE, latencies
