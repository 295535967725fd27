#!/usr/bin/env python3
"""Lean benchmark: the agent's import cost, each in a fresh interpreter (median of N runs).

  * ``import tapio.agent.cli`` (what ``python -m tapio agent`` pays before parsing flags),
  * the agent with every observer, the stdout/file sinks and the runtime imported,
  * the same plus controller mode (wire client, controller sink),
  * ``python -c pass`` as the interpreter's own floor.

Idle RSS and CPU of a running agent are measured by benchmarks/bench_agent.py (privileged);
this one runs unprivileged. Usage: ``.venv/bin/python benchmarks/bench_lean.py [--runs 5]``.

``--python OTHER`` (repeatable) measures other interpreters' trees in the same run, e.g. the
venv of a checkout before a change: each case's samples alternate between the trees (this one
first), so a comparison is not skewed by whatever else the machine did meanwhile.

Bytecode: an installed agent imports compiled modules (pip compiles a wheel's modules when it
installs them, and the image's venv keeps them), so by default each tree's warm-up run writes
its bytecode caches to a private temporary directory (``PYTHONPYCACHEPREFIX``; the trees
themselves stay untouched) and the timed runs read them. ``--compile`` measures instead what a
checkout run under ``PYTHONDONTWRITEBYTECODE=1`` pays, every one of its modules compiled from
source at each start (how this benchmark measured before the bytecode was cached).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
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


def child_env(pycache: str | None) -> dict[str, str]:
    """Bytecode cached in ``pycache`` (written by the warm-up), or never written if None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",)}
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def run_once(
    code: str, python: str = sys.executable, pycache: str | None = None
) -> tuple[float, int]:
    env = child_env(pycache)
    t0 = time.perf_counter()
    out = subprocess.run(
        [python, "-c", code + RSS_PROBE],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return time.perf_counter() - t0, int(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="OTHER",
        help="also measure this interpreter's tree, alternating with this one (repeatable)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="no bytecode cache: every module compiled from source in every run",
    )
    args = parser.parse_args()
    pythons = [sys.executable, *args.python]
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        caches: dict[str, str | None] = {
            p: None if args.compile else os.path.join(tmp, str(i)) for i, p in enumerate(pythons)
        }
        rows = measure(pythons, caches, args.runs)
    mode = "compiled from source in each run" if args.compile else "bytecode cached"
    for python in pythons:
        # The interpreter floor is the first case.
        floor = rows[python][0][1]
        print(f"lean: import cost in a fresh interpreter (median of {args.runs}, {mode}): {python}")
        print(f"{'case':44} {'wall ms':>9} {'- floor':>9} {'max RSS MiB':>12} {'target':>10}  ok")
        for name, wall, rss, target in rows[python]:
            extra = wall - floor
            ok = "" if target is None else ("yes" if extra <= target else "NO")
            tgt = "" if target is None else f"<= {target * 1000:.0f} ms"
            print(f"{name:44} {wall * 1000:9.1f} {extra * 1000:9.1f} {rss:12.1f} {tgt:>10}  {ok}")
    return 0


Row = tuple[str, float, float, float | None]


def measure(pythons: list[str], caches: dict[str, str | None], runs: int) -> dict[str, list[Row]]:
    """Per interpreter, per case: (name, median wall s, median max RSS MiB, target)."""
    rows: dict[str, list[Row]] = {p: [] for p in pythons}
    for name, code, target in CASES:
        samples: dict[str, list[tuple[float, int]]] = {p: [] for p in pythons}
        for python in pythons:
            run_once(code, python, caches[python])  # warm the page cache and bytecode
        for _ in range(runs):
            for python in pythons:
                samples[python].append(run_once(code, python, caches[python]))
        for python in pythons:
            wall = statistics.median(s[0] for s in samples[python])
            rss = statistics.median(s[1] for s in samples[python]) / 1024
            rows[python].append((name, wall, rss, target))
    return rows


if __name__ == "__main__":
    sys.exit(main())
