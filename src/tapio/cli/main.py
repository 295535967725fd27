"""``python -m tapio [--data-dir DIR] [--color WHEN] status|watch|recent|health|mcp``.

Reads the file sink's occurrence directory (``--data-dir``, ``TAPIO_DATA_DIR``, default
``.tapio/occurrences``); never talks to the agent. ``main(argv)`` receives the full argument list
(the command word included) and returns the exit code: 0 success, 1 an unreadable data directory
(``health``: the node is not healthy), 2 a usage error, 3 ``health`` found no data to judge, 130
interrupted (Ctrl-C; ``watch`` treats Ctrl-C as its normal end and exits 0).

Options shared by every command (``--data-dir``, ``--color``) are accepted before or after the
command word; a bad option is reported with the usage of the command it was given to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from tapio.cli.commands import COMMANDS, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Console
from tapio.cli.render import COLOR_MODES
from tapio.cli.store import (
    CLUSTER_KNOWN_TYPES,
    CLUSTER_OBSERVERS,
    DEFAULT_DATA_DIR,
    KNOWN_TYPES,
    OBSERVERS,
    SEVERITIES,
    Clock,
    DataDirError,
    parse_time,
    system_clock,
)

RECENT_LIMIT = 20

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an option it does not know is *its* usage error (its own usage
    line, exit 2), not the top-level parser's generic "unrecognized arguments"."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


# --------------------------------------------------------------------------------------------
# argument types


def _time(text: str) -> str:
    """Checked now (syntax), resolved against the clock when the command runs."""
    try:
        parse_time(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"count must be positive, got {value}")
    return value


def _choice_error(
    value: str, what: str, choices: Sequence[str], cluster: Sequence[str] = ()
) -> argparse.ArgumentTypeError:
    more = [c for c in cluster if c not in choices]
    also = f"; with --controller also {', '.join(more)}" if more else ""
    return argparse.ArgumentTypeError(
        f"invalid choice {value!r}: unknown {what} (choose from {', '.join(choices)}){also}"
    )


def _csv(
    choices: Sequence[str], what: str, cluster: Sequence[str] = ()
) -> Callable[[str], list[str]]:
    """A comma-separated list of ``choices``; ``cluster`` values (what only a controller's
    window holds) pass here and are refused without ``--controller`` by :func:`_cluster_usage`."""

    def parse(text: str) -> list[str]:
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        bad = [v for v in values if v not in choices and v not in cluster]
        if bad:
            raise _choice_error(bad[0], what, choices, cluster)
        return values

    return parse


def _observer(text: str) -> str:
    value = text.strip().lower()
    if value not in CLUSTER_OBSERVERS:
        raise _choice_error(value, "observer", OBSERVERS, CLUSTER_OBSERVERS)
    return value


def _non_empty(text: str) -> str:
    value = text.strip()
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return value


# --------------------------------------------------------------------------------------------
# the parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"occurrence directory (env TAPIO_DATA_DIR, default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--color",
        "--colour",
        dest="color",
        choices=COLOR_MODES,
        default=argparse.SUPPRESS,
        help="colour the text output: auto (a terminal without NO_COLOR), always, never",
    )


def _add_output(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help=f"output format (json: {json_help})",
    )
    parser.add_argument(
        "--json", dest="output", action="store_const", const="json", help="same as -o json"
    )


def _add_window(parser: argparse.ArgumentParser) -> None:
    when = "TIME"
    parser.add_argument(
        "--since",
        type=_time,
        metavar=when,
        help="only from this time on: N s/m/h/d ago (15m, 2h) or RFC 3339 with offset",
    )
    parser.add_argument(
        "--until",
        type=_time,
        metavar=when,
        help="only up to this time (same forms as --since)",
    )


# The repeatable comma-separated filters: (option, its known values on a node, the cluster's,
# what one value is called in an error, metavar, help).
_LIST_FILTERS: tuple[tuple[str, Sequence[str], Sequence[str], str, str, str], ...] = (
    (
        "--observer",
        OBSERVERS,
        CLUSTER_OBSERVERS,
        "observer",
        "NAME[,NAME]",
        f"only these observers ({', '.join(CLUSTER_OBSERVERS)}); repeatable",
    ),
    (
        "--type",
        KNOWN_TYPES,
        CLUSTER_KNOWN_TYPES,
        "anomaly type",
        "TYPE[,TYPE]",
        "only these anomaly types (e.g. kernel.network.connection_refused); repeatable",
    ),
    (
        "--severity",
        SEVERITIES,
        (),
        "severity",
        "LEVEL[,LEVEL]",
        f"only these severities ({', '.join(SEVERITIES)}); repeatable",
    ),
)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    for option, choices, cluster, what, metavar, help_text in _LIST_FILTERS:
        parser.add_argument(
            option,
            action="extend",
            type=_csv(choices, what, cluster),
            default=None,
            metavar=metavar,
            help=help_text,
        )
    parser.add_argument(
        "--min-severity",
        choices=SEVERITIES,
        default=None,
        metavar="LEVEL",
        help="only this severity or worse",
    )
    parser.add_argument(
        "--container-id",
        type=_non_empty,
        metavar="ID",
        help="only this container (full id or a prefix of at least 6 characters)",
    )
    parser.add_argument(
        "--pod-uid",
        type=_non_empty,
        metavar="UID",
        help="only this Kubernetes pod UID (dashes or underscores)",
    )


def _add_controller(parser: argparse.ArgumentParser) -> None:
    """The cluster view: ask a controller's evidence window instead of a data directory."""
    g = parser.add_argument_group("cluster view (read a Tapio controller instead of --data-dir)")
    g.add_argument(
        "--controller",
        metavar="URL",
        help="the controller's base URL (http(s)://HOST:PORT); reads its GET /v1/evidence",
    )
    g.add_argument("--token-file", metavar="FILE", help="bearer token for the controller")
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle for an https controller")
    for name, what in (
        ("namespace", "Kubernetes namespace"),
        ("pod", "pod name"),
        ("node", "node name"),
        ("workload", "workload: name or Kind/name"),
    ):
        g.add_argument(f"--{name}", type=_non_empty, metavar=name.upper(), help=f"only this {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapio",
        description="Inspect the kernel anomaly evidence written by the Tapio agent's file sink.",
    )
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_CommandParser)
    sub.required = True

    p = sub.add_parser("status", help="per-observer counts and last seen (all time)")
    _add_common(p)
    _add_output(p, "one document")
    _add_window(p)
    _add_filters(p)
    _add_controller(p)

    p = sub.add_parser("watch", help="follow new occurrences as they are written")
    _add_common(p)
    _add_output(p, "compact JSON lines")
    for name in OBSERVERS:
        p.add_argument(f"--{name}", action="store_true", help=f"{name} observer (OR-ed)")
    _add_filters(p)
    p.add_argument("--poll", action="store_true", help="poll every 200 ms instead of inotify")

    p = sub.add_parser("recent", help=f"the newest occurrences (at most {RECENT_LIMIT})")
    _add_common(p)
    _add_output(p, "compact JSON lines, newest first")
    _add_window(p)
    p.add_argument(
        "--limit",
        "-n",
        type=_positive_int,
        default=RECENT_LIMIT,
        metavar="N",
        help=f"show at most N (default {RECENT_LIMIT})",
    )
    _add_filters(p)
    _add_controller(p)

    p = sub.add_parser(
        "health",
        help="health of the last hour (exit 0 healthy, 1 not healthy, 3 no data)",
        description="Health of the last hour. Exit status: 0 healthy, 1 not healthy (anomalies "
        "in the last hour or a failed observer), 2 usage error, 3 no data (the data directory "
        "is missing or unreadable).",
    )
    _add_common(p)
    _add_output(p, "one document")
    p.add_argument(
        "observer",
        nargs="?",
        type=_observer,
        help=f"one observer ({', '.join(CLUSTER_OBSERVERS)})",
    )
    _add_controller(p)

    p = sub.add_parser("mcp", help="read-only MCP server on stdio")
    _add_common(p)
    return parser


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
        opts: dict[str, Any] = vars(args)
        con = Console(out, err, env, clock, opts.get("color", "auto"))
        cluster = _cluster_usage(opts)
        if cluster is not None:
            parser.print_usage(err)
            err.write(f"tapio {args.command}: error: {cluster}\n")
            return EXIT_USAGE
        try:
            if opts.get("controller"):
                from tapio.cli.cluster import COMMANDS as CLUSTER_COMMANDS

                return CLUSTER_COMMANDS[args.command](args, con)
            return COMMANDS[args.command](args, con, data_dir)
        except DataDirError as exc:
            con.error(str(exc))
            return EXIT_ERROR
        except BrokenPipeError:
            _silence_stdout(out)
            return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _cluster_usage(opts: dict[str, Any]) -> str | None:
    """Why the cluster options do not fit together (None: they do)."""
    if opts.get("controller"):
        if "data_dir" in opts:
            return "--controller and --data-dir read different things; give one"
        return None
    scope = ("token_file", "ca_file", "namespace", "pod", "node", "workload")
    # (watch has no cluster view; its --node is the node-observer flag, not a node name)
    for name in scope if opts.get("command") != "watch" else ():
        if opts.get(name):
            return f"--{name.replace('_', '-')} needs --controller URL"
    for name, node_side in (("observer", OBSERVERS), ("type", KNOWN_TYPES)):
        values = opts.get(name) or ()
        for value in [values] if isinstance(values, str) else values:
            if value not in node_side:
                return f"{name} {value!r} is cluster evidence: it needs --controller URL"
    return None


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
