#!/usr/bin/env python3
"""Lean benchmark: the agent's import cost, each in a fresh interpreter (median of N runs).

  * ``import tapio.agent.cli`` (what ``python -m tapio agent`` pays before parsing flags),
  * the agent with every observer, the stdout/file sinks and the runtime imported,
  * the same plus controller mode (wire client, controller sink),
  * ``python -c pass`` as the interpreter's own floor.

Idle RSS and CPU of a running agent are measured by benchmarks/bench_agent.py (privileged);
this one runs unprivileged. Usage: ``.venv/bin/python benchmarks/bench_lean.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

AGENT = (
    "import tapio.agent.cli, tapio.agent.runtime, tapio.agent.pipeline, tapio.sinks.stdout,"
    " tapio.sinks.file, tapio.observers.network, tapio.observers.container,"
    " tapio.observers.storage, tapio.observers.node"
)
CASES: tuple[tuple[str, str, float | None], ...] = (
    ("interpreter floor (python -c pass)", "pass", None),
    ("same-run baseline: import json", "import json", None),
    ("same-run baseline: import asyncio", "import asyncio", None),
    ("import tapio.agent.cli", "import tapio.agent.cli", 0.15),
    ("agent + all observers + stdout/file sinks", AGENT, 0.60),
    (
        "  + controller mode",
        AGENT + "; import tapio.agent.controller_mode, tapio.sinks.controller",
        0.75,
    ),
)
RSS_PROBE = "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def run_once(code: str) -> tuple[float, int]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code + RSS_PROBE],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return time.perf_counter() - t0, int(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float | None]] = []
    floor = 0.0
    for name, code, target in CASES:
        run_once(code)  # warm the page cache and bytecode
        samples = [run_once(code) for _ in range(args.runs)]
        wall = statistics.median(s[0] for s in samples)
        rss = statistics.median(s[1] for s in samples) / 1024
        if code == "pass":
            floor = wall
        rows.append((name, wall, rss, target))
    print(f"lean: import cost in a fresh interpreter (median of {args.runs})")
    print(f"{'case':44} {'wall ms':>9} {'- floor':>9} {'max RSS MiB':>12} {'target':>10}  ok")
    for name, wall, rss, target in rows:
        extra = wall - floor
        ok = "" if target is None else ("yes" if extra <= target else "NO")
        tgt = "" if target is None else f"<= {target * 1000:.0f} ms"
        print(f"{name:44} {wall * 1000:9.1f} {extra * 1000:9.1f} {rss:12.1f} {tgt:>10}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
