#!/usr/bin/env python3
"""Run every benchmark in sequence and print its output: ``benchmarks/bench_*.py`` (sorted),
then the controller ingest benchmark. Root is needed for the kernel ones (bench_agent.py and
the observers' benchmarks); without root those are reported as skipped.

    sudo .venv/bin/python benchmarks/run_all.py [--only NAME ...]

Exits non-zero when a benchmark failed (not when it missed a target: read the tables).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRA = ("controller_ingest.py",)
NEEDS_ROOT_MARKERS = re.compile(r"geteuid\(\)|\bneeds root\b|\brun as root\b", re.IGNORECASE)


def benchmarks() -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    found += [HERE / name for name in EXTRA if (HERE / name).is_file()]
    return found


def needs_root(path: Path) -> bool:
    """A benchmark that checks its euid or says it needs root (docstring or message)."""
    return NEEDS_ROOT_MARKERS.search(path.read_text()) is not None


def load() -> str:
    """The 1/5/15-minute load averages: a shared machine's figures need them next to them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", help="run only these (file stem), repeatable")
    args = parser.parse_args()
    selected = [b for b in benchmarks() if not args.only or b.stem in args.only]
    if not selected:
        sys.exit(f"run_all: nothing matches {args.only}")
    failed: list[str] = []
    for bench in selected:
        print(f"==== {bench.name} (load average {load()})", flush=True)
        if os.geteuid() != 0 and needs_root(bench):
            print("skipped: needs root\n", flush=True)
            continue
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(bench)], cwd=HERE.parent).returncode
        took = time.monotonic() - t0
        print(
            f"---- {bench.name}: exit {rc} after {took:.0f} s (load average {load()})\n", flush=True
        )
        if rc != 0:
            failed.append(bench.name)
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
