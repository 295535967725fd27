"""``python -m tapio [--data-dir DIR] status|watch|recent|health|mcp``.

Reads the file sink's occurrence directory (``--data-dir``, ``TAPIO_DATA_DIR``, default
``.tapio/occurrences``); never talks to the agent. ``main(argv)`` receives the full argument list
(the command word included) and returns the exit code: 0 success, 1 an unreadable data directory,
2 a usage error, 130 interrupted (Ctrl-C; ``watch`` treats Ctrl-C as its normal end and exits 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from tapio.cli import render
from tapio.cli.store import (
    DEFAULT_DATA_DIR,
    HOUR_NS,
    OBSERVERS,
    SEVERITIES,
    Clock,
    DataDirError,
    Filter,
    Record,
    iter_records,
    newest,
    parse_duration,
    select,
    summarize,
    system_clock,
)

RECENT_LIMIT = 20
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Console:
    """Where a command writes: stdout/stderr, colour decision and the clock (all injectable)."""

    def __init__(
        self,
        stdout: TextIO,
        stderr: TextIO,
        environ: Mapping[str, str],
        clock: Clock,
    ) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.environ = environ
        self.clock = clock
        self.style = render.Style(render.colour_enabled(stdout, environ))

    def out(self, lines: Sequence[str]) -> None:
        if lines:
            self.stdout.write("\n".join(lines) + "\n")
        self.stdout.flush()

    def warn(self, path: str, reason: str) -> None:
        self.stderr.write(f"warning: skipped {path}: {reason}\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        self.stderr.write(f"error: {message}\n")
        self.stderr.flush()


# --------------------------------------------------------------------------------------------
# argument parsing


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"count must be positive, got {value}")
    return value


def _csv(choices: Sequence[str] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {bad[0]!r} (choose from {', '.join(choices)})"
                )
        return values

    return parse


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"occurrence directory (env TAPIO_DATA_DIR, default {DEFAULT_DATA_DIR})",
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--observer",
        action="extend",
        type=_csv(None),
        default=None,
        metavar="NAME[,NAME]",
        help="only these observers (network, container, storage, node); repeatable",
    )
    parser.add_argument(
        "--severity",
        action="extend",
        type=_csv(SEVERITIES),
        default=None,
        metavar="LEVEL[,LEVEL]",
        help=f"only these severities ({', '.join(SEVERITIES)}); repeatable",
    )
    parser.add_argument(
        "--min-severity",
        choices=SEVERITIES,
        default=None,
        metavar="LEVEL",
        help="only this severity or worse",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapio",
        description="Inspect the kernel anomaly evidence written by the Tapio agent's file sink.",
    )
    _add_data_dir(parser)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    p = sub.add_parser("status", help="per-observer counts and last seen (all time)")
    _add_data_dir(p)
    p.add_argument("--since", type=_duration, metavar="<N><unit>", help="only the last N s/m/h/d")

    p = sub.add_parser("watch", help="follow new occurrences as they are written")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="compact JSON lines")
    for name in OBSERVERS:
        p.add_argument(f"--{name}", action="store_true", help=f"{name} observer (OR-ed)")
    _add_filters(p)
    p.add_argument("--poll", action="store_true", help="poll every 200 ms instead of inotify")

    p = sub.add_parser("recent", help=f"the newest occurrences (at most {RECENT_LIMIT})")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="compact JSON lines, newest first")
    p.add_argument("--since", type=_duration, metavar="<N><unit>", help="only the last N s/m/h/d")
    p.add_argument(
        "--limit",
        "-n",
        type=_positive_int,
        default=RECENT_LIMIT,
        metavar="N",
        help=f"show at most N (default {RECENT_LIMIT})",
    )
    _add_filters(p)

    p = sub.add_parser("health", help="health summary of the last hour")
    _add_data_dir(p)
    p.add_argument("observer", nargs="?", help="one observer in detail")

    p = sub.add_parser("mcp", help="read-only MCP server on stdio")
    _add_data_dir(p)
    return parser


def _observer_set(args: argparse.Namespace, *, flags: bool) -> frozenset[str] | None:
    chosen: set[str] = set(args.observer or ())
    if flags:
        chosen.update(name for name in OBSERVERS if getattr(args, name, False))
    return frozenset(chosen) if chosen else None


def _filter(args: argparse.Namespace, clock: Clock, *, flags: bool) -> Filter:
    since = getattr(args, "since", None)
    severities = getattr(args, "severity", None)
    return Filter(
        observers=_observer_set(args, flags=flags) if hasattr(args, "observer") else None,
        severities=frozenset(severities) if severities else None,
        min_severity=getattr(args, "min_severity", None),
        since_ns=clock() - since if since is not None else None,
    )


# --------------------------------------------------------------------------------------------
# commands


def cmd_status(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    summary = summarize(
        select(iter_records(data_dir, con.warn), _filter(args, con.clock, flags=False))
    )
    con.out(render.status_table(summary))
    return EXIT_OK


def _json_lines(records: Sequence[Record]) -> list[str]:
    from tapio.occurrence import encode

    return [encode(rec.occ).decode() for rec in records]


def cmd_recent(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    flt = _filter(args, con.clock, flags=False)
    records = newest(select(iter_records(data_dir, con.warn), flt), args.limit)
    if not records:
        con.out(["no anomalies recorded"])
    elif args.json:
        con.out(_json_lines(records))
    else:
        con.out(render.occurrence_lines(records, con.style))
    return EXIT_OK


def cmd_health(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    flt = Filter(since_ns=con.clock() - HOUR_NS)
    summary = summarize(select(iter_records(data_dir, con.warn), flt))
    observer = args.observer.strip().lower() if args.observer else None
    if observer:
        con.out(render.health_observer(summary.get(observer)))
    else:
        con.out(render.health_table(summary, con.style))
    con.out(_agent_status_lines(data_dir, observer, con.clock()))
    return EXIT_OK


def _agent_status_lines(data_dir: str, observer: str | None, now_ns: int) -> list[str]:
    """What the agent's status file adds: failed observers and anomaly types this node cannot
    produce (e.g. ipc_degradation without a hardware PMU). Nothing when there is no agent
    status next to the occurrences, so the reference output is unchanged."""
    from tapio.status import read_status

    status = read_status(data_dir)
    if status is None:
        return []
    lines = [""]
    age = max(0, now_ns // 1_000_000_000 - int(status.written_at_unix))
    lines.append(f"agent: generation {status.config_generation}, status {age}s old")
    for name, obs in sorted(status.observers.items()):
        if observer and name != observer:
            continue
        if obs.state != "running":
            lines.append(f"  {name}: {obs.state}" + (f" ({obs.error})" if obs.error else ""))
        for anomaly, why in sorted(obs.unsupported.items()):
            lines.append(f"  {name}: {anomaly} unsupported: {why}")
        if obs.degraded_reasons:
            lines.append(f"  {name}: degraded: {', '.join(obs.degraded_reasons)}")
    return lines if len(lines) > 2 else lines[:2]


def cmd_watch(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    from tapio.cli.watch import Watcher

    flt = _filter(args, con.clock, flags=True)

    def emit(records: list[Record]) -> None:
        shown = [rec for rec in records if flt.matches(rec)]
        if not shown:
            return
        if args.json:
            con.out(_json_lines(shown))
        else:
            width = render.WATCH_TYPE_WIDTH
            con.out([render.occurrence_line(rec, con.style, width) for rec in shown])

    watcher = Watcher(data_dir, emit, con.warn, use_inotify=not args.poll)
    try:
        watcher.start()
        watcher.run()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        watcher.close()
    return EXIT_OK  # pragma: no cover - run() only returns when stopped


def cmd_mcp(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    from tapio.cli.mcp_server import run

    return run(data_dir, clock=con.clock)


COMMANDS: dict[str, Callable[[argparse.Namespace, Console, str], int]] = {
    "status": cmd_status,
    "watch": cmd_watch,
    "recent": cmd_recent,
    "health": cmd_health,
    "mcp": cmd_mcp,
}


def main(
    argv: Sequence[str],
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Clock = system_clock,
) -> int:
    """Run one CLI command; ``argv`` includes the command word (``["recent", "--json"]``)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = os.environ if environ is None else environ
    parser = build_parser()
    try:
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                args = parser.parse_args(list(argv))
        except SystemExit as exc:  # --help or a usage error (already printed by argparse)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        data_dir = getattr(args, "data_dir", None) or env.get("TAPIO_DATA_DIR") or DEFAULT_DATA_DIR
        con = Console(out, err, env, clock)
        try:
            return COMMANDS[args.command](args, con, data_dir)
        except DataDirError as exc:
            con.error(str(exc))
            return EXIT_ERROR
        except BrokenPipeError:
            _silence_stdout(out)
            return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _silence_stdout(stream: TextIO) -> None:
    """After EPIPE (``tapio recent | head``) point stdout at /dev/null so the interpreter's
    final flush does not print a traceback."""
    if stream is sys.stdout:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except OSError:
            pass
