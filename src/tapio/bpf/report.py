"""``python -m tapio.bpf.report [--json] [OBJECTS_DIR]``: what each observer's object does here.

Loads every observer's object the way the agent does (optional programs declared, probes
first, one retry per program the kernel refuses), attaches it, and prints which programs run,
which were left out and why, and which anomaly types are therefore unsupported on this kernel.
Needs the agent's privileges; run it under the kernel-test lock on a shared machine. Exits 1
when an observer cannot start at all.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import msgspec

from tapio.bpf.libbpf import BpfError
from tapio.bpf.loader import objects_dir
from tapio.observers import observer_class
from tapio.observers.base import ObserverContext

OBSERVERS = ("network", "storage", "node", "container")


class ObserverReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    observer: str
    started: bool
    error: str = ""
    attached: list[str] = []
    #: program -> why it is not running
    skipped: dict[str, str] = {}
    #: alternatives not needed because another program of their group runs
    unused: list[str] = []
    #: anomaly type -> why it is unsupported here
    unsupported: dict[str, str] = {}


def report_one(name: str, directory: Path) -> ObserverReport:
    cls = observer_class(name)
    observer = cls(ObserverContext(boot_offset_ns=0))
    try:
        with observer.open_object(directory / f"{cls.object_name}.bpf.o") as obj:
            try:
                observer.attach(obj)
                observer.note_programs(obj)
            finally:
                observer.close()
            unsupported: dict[str, str] = {}
            for cap in observer.capabilities():
                if not cap.available:
                    for anomaly in cap.anomalies:
                        unsupported.setdefault(anomaly, cap.detail)
            return ObserverReport(
                observer=name,
                started=True,
                attached=sorted(obj.attached),
                skipped=dict(sorted(obj.skipped.items())),
                unused=sorted(obj.unused),
                unsupported=unsupported,
            )
    except (BpfError, OSError, ValueError) as exc:
        return ObserverReport(observer=name, started=False, error=str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tapio.bpf.report", description=__doc__)
    parser.add_argument("objects", nargs="?", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--observer", action="append", choices=OBSERVERS)
    args = parser.parse_args(argv)
    directory = args.objects or objects_dir()
    reports = [report_one(n, directory) for n in args.observer or OBSERVERS]
    if args.json:
        doc = {"kernel": platform.release(), "observers": reports}
        sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")
    else:
        print(f"kernel {platform.release()}")
        for r in reports:
            if not r.started:
                print(f"{r.observer}: NOT STARTED: {r.error}")
                continue
            print(f"{r.observer}: running {', '.join(r.attached)}")
            for prog, why in r.skipped.items():
                print(f"  {prog}: left out: {why}")
            for anomaly, why in r.unsupported.items():
                print(f"  {anomaly} unsupported: {why}")
    return 0 if all(r.started for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
