"""The CLI commands: each reads the occurrence directory and writes text or JSON.

Exit codes (documented in docs/cli.md): 0 success (for ``health``: healthy), 1 an unreadable
data directory for ``status``/``recent``/``watch``, or for ``health`` a node that is not healthy
(anomalies in the last hour or a failed observer), 2 a usage error (argparse), 3 ``health`` has
no data to judge (the data directory is missing or cannot be read), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from tapio.cli import render
from tapio.cli.store import (
    HOUR_NS,
    OBSERVERS,
    Clock,
    DataDirError,
    Filter,
    Record,
    Summary,
    data_dir_problem,
    iter_records,
    newest,
    parse_time,
    select,
    summarize,
)

if TYPE_CHECKING:
    from tapio.status import AgentStatus

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2
EXIT_NO_DATA = 3
EXIT_INTERRUPTED = 130


class Console:
    """Where a command writes: stdout/stderr, colour decision and the clock (all injectable)."""

    def __init__(
        self,
        stdout: TextIO,
        stderr: TextIO,
        environ: Mapping[str, str],
        clock: Clock,
        color: str = "auto",
    ) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.environ = environ
        self.clock = clock
        self.style = render.Style(render.colour_enabled(stdout, environ, color))

    def out(self, lines: Sequence[str]) -> None:
        if lines:
            self.stdout.write("\n".join(lines) + "\n")
        self.stdout.flush()

    def warn(self, path: str, reason: str) -> None:
        self.stderr.write(f"warning: skipped {path}: {reason}\n")
        self.stderr.flush()

    def note(self, message: str) -> None:
        self.stderr.write(f"note: {message}\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        self.stderr.write(f"error: {message}\n")
        self.stderr.flush()


def _json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "text") == "json"


def _observer_set(args: argparse.Namespace, *, flags: bool) -> frozenset[str] | None:
    chosen: set[str] = set(getattr(args, "observer", None) or ())
    if flags:
        chosen.update(name for name in OBSERVERS if getattr(args, name, False))
    return frozenset(chosen) if chosen else None


def make_filter(args: argparse.Namespace, clock: Clock, *, flags: bool) -> Filter:
    """The filter the options ask for; ``--since``/``--until`` are resolved against the clock
    here (the parser has already checked their syntax)."""
    since = getattr(args, "since", None)
    until = getattr(args, "until", None)
    now = clock() if since is not None or until is not None else 0
    severities = getattr(args, "severity", None)
    types = getattr(args, "type", None)
    return Filter(
        observers=_observer_set(args, flags=flags),
        severities=frozenset(severities) if severities else None,
        min_severity=getattr(args, "min_severity", None),
        since_ns=parse_time(since, now) if since is not None else None,
        until_ns=parse_time(until, now) if until is not None else None,
        types=frozenset(types) if types else None,
        container_id=getattr(args, "container_id", None),
        pod_uid=getattr(args, "pod_uid", None),
    )


def _note_if_nothing_there(con: Console, data_dir: str) -> None:
    """Name the directory that was read when it is missing or holds no occurrence file, so an
    empty answer caused by a wrong ``--data-dir`` is not mistaken for a quiet node."""
    problem = data_dir_problem(data_dir)
    if problem is not None:
        con.note(problem[1])


def _json_lines(records: Sequence[Record]) -> list[str]:
    from tapio.occurrence import encode

    return [encode(rec.occ).decode() for rec in records]


def cmd_status(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    flt = make_filter(args, con.clock, flags=False)
    summary = summarize(select(iter_records(data_dir, con.warn), flt))
    if summary.total == 0:
        _note_if_nothing_there(con, data_dir)
    if _json(args):
        con.out([json.dumps(render.status_json(summary), ensure_ascii=False)])
    else:
        con.out(render.status_table(summary))
    return EXIT_OK


def cmd_recent(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    flt = make_filter(args, con.clock, flags=False)
    records = newest(select(iter_records(data_dir, con.warn), flt), args.limit)
    if not records:
        _note_if_nothing_there(con, data_dir)
        if not _json(args):  # JSON lines: no occurrence, no line
            con.out(["no anomalies recorded"])
    elif _json(args):
        con.out(_json_lines(records))
    else:
        con.out(render.occurrence_lines(records, con.style))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# health


def _agent_status_lines(status: AgentStatus | None, observer: str | None, now_ns: int) -> list[str]:
    """What the agent's status file adds: failed observers and anomaly types this node cannot
    produce (e.g. ipc_degradation without a hardware PMU). Nothing when there is no agent
    status next to the occurrences, so the table alone stays as it always was."""
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


def _agent_json(status: AgentStatus | None, now_ns: int) -> dict[str, Any] | None:
    if status is None:
        return None
    return {
        "config_generation": status.config_generation,
        "status_age_seconds": max(0, now_ns // 1_000_000_000 - int(status.written_at_unix)),
        "observers": {
            name: {
                "state": obs.state,
                "error": obs.error or None,
                "degraded_reasons": list(obs.degraded_reasons),
                "unsupported": dict(obs.unsupported),
            }
            for name, obs in sorted(status.observers.items())
        },
    }


def health_doc(
    summary: Summary, observer: str | None, healthy: bool, failed: list[str], **more: Any
) -> dict[str, Any]:
    """``health --json``: the last hour's figures (of one observer or all), then ``more``
    (the agent's status file on a node, the agents a controller knows in the cluster view)."""
    stats = [summary.get(observer)] if observer else summary.ordered(include_fixed=True)
    return {
        "status": summary.get(observer).status if observer else summary.status,
        "healthy": healthy,
        "observer": observer,
        "window_seconds": HOUR_NS // 1_000_000_000,
        "total_anomalies_1h": sum(s.count for s in stats),
        "total_critical_1h": sum(s.critical for s in stats),
        "failed_observers": failed,
        "observers": [render.observer_json(s) for s in stats],
        **more,
    }


def cmd_health(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    """Health of the last hour. The exit code makes it a check: 0 healthy, 1 not healthy
    (any anomaly in the window, or an observer the agent reports as not running), 3 no data."""
    from tapio.status import read_status

    problem = data_dir_problem(data_dir)
    if problem is not None and problem[0] == "missing":
        con.error(f"no data: {problem[1]}")
        return EXIT_NO_DATA
    now = con.clock()
    try:
        window = Filter(since_ns=now - HOUR_NS)
        summary = summarize(select(iter_records(data_dir, con.warn), window))
    except DataDirError as exc:
        con.error(f"no data: {exc}")
        return EXIT_NO_DATA
    if problem is not None:
        con.note(problem[1])
    observer: str | None = args.observer
    agent = read_status(data_dir)
    failed = sorted(
        name
        for name, obs in (agent.observers.items() if agent is not None else ())
        if obs.state != "running" and (observer is None or name == observer)
    )
    status = summary.get(observer).status if observer else summary.status
    healthy = status == "healthy" and not failed
    if _json(args):
        doc = health_doc(summary, observer, healthy, failed, agent=_agent_json(agent, now))
        con.out([json.dumps(doc, ensure_ascii=False)])
    else:
        if observer:
            con.out(render.health_observer(summary.get(observer)))
        else:
            con.out(render.health_table(summary, con.style))
        con.out(_agent_status_lines(agent, observer, now))
    return EXIT_OK if healthy else EXIT_UNHEALTHY


# --------------------------------------------------------------------------------------------
# watch, mcp


def cmd_watch(args: argparse.Namespace, con: Console, data_dir: str) -> int:
    import os

    from tapio.cli.watch import Watcher

    flt = make_filter(args, con.clock, flags=True)
    as_json = _json(args)

    def emit(records: list[Record]) -> None:
        shown = [rec for rec in records if flt.matches(rec)]
        if not shown:
            return
        if as_json:
            con.out(_json_lines(shown))
        else:
            width = render.WATCH_TYPE_WIDTH
            con.out([render.occurrence_line(rec, con.style, width) for rec in shown])

    if not os.path.lexists(data_dir):
        con.note(f"data directory {data_dir} does not exist yet; waiting for it")
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
