"""``python -m tapio agent``: parse the flags and the config, build the agent, call ``run``.

Everything decided from the command line happens here, before anything touches the kernel: a
bad flag or config exits 2 with one line. The agent's lifetime (``startup``, ``serve``,
``shutdown``) is :class:`tapio.agent.runtime.Agent`'s: a host that cannot run eBPF exits 1 with
one line saying why; SIGTERM/SIGINT exit 0 after the sinks flush.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tapio import __version__

if TYPE_CHECKING:
    from tapio.logs import LogFormat
    from tapio.sinks.base import Sink

# Only what parsing the flags needs is imported with this module; anyio, msgspec, structlog,
# the metrics registry and the sinks are imported by ``main`` once the flags are good, so a bad
# flag, ``--help`` or ``--version`` answers at once.

SINK_NAMES = ("stdout", "file", "http", "controller", "otlp")
DEFAULT_OBSERVERS = ("network", "container", "storage", "node")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"tapio agent: {message}\n")


def interval(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {value!r}") from None
    if n < 5:
        raise argparse.ArgumentTypeError(f"must be >= 5 seconds, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tapio agent", description="Run the Tapio eBPF node agent.")
    p.add_argument("--config", default="/etc/tapio/tapio.toml", help="TOML config file")
    p.add_argument("--sink", action="append", choices=SINK_NAMES, help="repeatable; default stdout")
    p.add_argument("--ebpf-dir", type=Path, help="directory of *.bpf.o (default: packaged)")
    p.add_argument("--data-dir", default=".tapio/occurrences", help="file sink directory")
    p.add_argument("--http-endpoint", help="http sink endpoint (overrides [http] endpoint)")
    p.add_argument(
        "--otlp-endpoint",
        help="otlp sink base URL (overrides [otlp] endpoint and OTEL_EXPORTER_OTLP_*ENDPOINT)",
    )
    p.add_argument("--controller-endpoint", help="tapio-wire/v1 controller base URL")
    p.add_argument(
        "--controller-ca-file",
        metavar="PEM",
        help="CA bundle that verifies an https:// controller instead of the system store",
    )
    p.add_argument(
        "--controller-token-file",
        metavar="FILE",
        default=os.environ.get("TAPIO_CONTROLLER_TOKEN_FILE") or None,
        help="bearer token sent to the controller (env TAPIO_CONTROLLER_TOKEN_FILE); "
        "re-read when the file changes",
    )
    p.add_argument("--config-poll-interval", type=interval, default=30, metavar="SECONDS")
    p.add_argument("--heartbeat-interval", type=interval, default=30, metavar="SECONDS")
    p.add_argument(
        "--observer",
        action="append",
        help=f"observer to run, repeatable (default: {', '.join(DEFAULT_OBSERVERS)} as installed)",
    )
    p.add_argument(
        "--allow-missing-observer",
        action="store_true",
        help="keep running when an observer cannot start (same as [agent] allow_degraded = true)",
    )
    p.add_argument("--log-format", choices=("json", "console"), help="default: console on a TTY")
    p.add_argument("--log-level", default=os.environ.get("TAPIO_LOG_LEVEL", "info"))
    p.add_argument("-V", "--version", action="version", version=f"tapio-agent {__version__}")
    return p


def node_name() -> str:
    import socket

    return os.environ.get("TAPIO_NODE_NAME") or socket.gethostname() or "unknown-node"


def _token_error(path: str) -> bool:
    """True when ``path`` cannot serve as the controller token (to name the right flag)."""
    from tapio.transport import BearerToken

    try:
        BearerToken(file=path, env=None, what="--controller-token-file")
    except (OSError, ValueError):
        return True
    return False


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    import anyio
    import msgspec
    import structlog

    from tapio.logs import configure_logging

    log_format: LogFormat = args.log_format or ("console" if sys.stderr.isatty() else "json")
    try:
        configure_logging(log_format, args.log_level)
    except ValueError as exc:
        sys.stderr.write(f"tapio agent: {exc}\n")
        return 2
    log = structlog.get_logger("tapio.agent")

    from tapio.agent.preflight import PreflightError, run_preflight
    from tapio.agent.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        sys.stderr.write(f"tapio agent: {exc}\n")
        return 2
    if args.allow_missing_observer:
        settings.agent.allow_degraded = True

    sink_names = list(args.sink or ["stdout"])
    if "controller" in sink_names and not args.controller_endpoint:
        sys.stderr.write("tapio agent: --sink controller requires --controller-endpoint\n")
        return 2
    if args.controller_endpoint:
        from tapio.transport import parse_endpoint

        try:
            parse_endpoint(args.controller_endpoint, what="--controller-endpoint")
        except ValueError as exc:
            sys.stderr.write(f"tapio agent: {exc}\n")
            return 2
    if args.controller_ca_file or args.controller_token_file:
        if not args.controller_endpoint:
            flag = "--controller-ca-file" if args.controller_ca_file else "--controller-token-file"
            sys.stderr.write(f"tapio agent: {flag} requires --controller-endpoint\n")
            return 2
        import ssl

        from tapio.agent.controller_mode import link_for

        try:
            link_for(args)  # builds the shared link (and its TLS context) once, here
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            what = f"--controller-ca-file {args.controller_ca_file}"
            if args.controller_token_file and _token_error(args.controller_token_file):
                what = f"--controller-token-file {args.controller_token_file}"
            sys.stderr.write(f"tapio agent: {what}: {reason}\n")
            return 2

    from tapio.bpf.loader import objects_dir
    from tapio.observers import REGISTRY

    if args.observer:
        observers = list(dict.fromkeys(args.observer))
    else:
        observers = [o for o in DEFAULT_OBSERVERS if o in REGISTRY]
    unknown = [o for o in observers if o not in REGISTRY]
    if unknown:
        sys.stderr.write(
            f"tapio agent: unknown observer {unknown[0]!r} (known: {', '.join(sorted(REGISTRY))})\n"
        )
        return 2

    try:
        sinks = build_sinks(sink_names, args, settings)
    except (ValueError, OSError, msgspec.ValidationError) as exc:
        sys.stderr.write(f"tapio agent: {exc}\n")
        return 2

    from tapio.agent.kconfig import standalone_config, user_thresholds
    from tapio.agent.runtime import Agent, AgentOptions

    options = AgentOptions(
        ebpf_dir=args.ebpf_dir or objects_dir(),
        observers=observers,
        node_name=node_name(),
        initial_config=None if args.controller_endpoint else standalone_config(settings, observers),
        user_thresholds=user_thresholds(settings),
        status_dir=Path(args.data_dir) if "file" in sink_names else None,
        preflight=run_preflight,
    )
    agent = Agent(settings, options, sinks)
    _add_services(agent, args, settings)
    log.info("tapio agent starting", version=__version__, node=options.node_name)
    try:
        return anyio.run(agent.run)
    except PreflightError as exc:
        sys.stderr.write(f"tapio agent: {exc}\n")
        return 1
    except KeyboardInterrupt:  # SIGINT before the signal watcher took over
        return 0


def build_sinks(names: list[str], args: argparse.Namespace, settings: object) -> list[Sink]:
    import msgspec

    from tapio.agent.settings import AgentSettings
    from tapio.sinks.file import FileSink
    from tapio.sinks.stdout import StdoutSink

    assert isinstance(settings, AgentSettings)
    sinks: list[Sink] = []
    for name in names:
        if name == "stdout":
            sinks.append(StdoutSink())
        elif name == "file":
            sinks.append(FileSink(args.data_dir, settings.file))
        elif name == "http":
            from tapio.sinks.http import HttpSink, HttpSinkSettings

            doc = dict(settings.http)
            if args.http_endpoint:
                doc["endpoint"] = args.http_endpoint
            sinks.append(HttpSink(msgspec.convert(doc, HttpSinkSettings)))
        elif name == "otlp":
            from tapio.sinks.otlp import OtlpResource, OtlpSink
            from tapio.sinks.otlp_config import resolve

            section = dict(settings.otlp)
            if args.otlp_endpoint:
                section.pop("logs_endpoint", None)
                section["endpoint"] = args.otlp_endpoint
            otlp = resolve(section, os.environ)  # TOML and flags win over OTEL_*
            sinks.append(OtlpSink(otlp, OtlpResource.detect(otlp)))
        elif name == "controller":
            from tapio.agent.controller_mode import make_controller_sink

            sinks.append(make_controller_sink(args))
    return sinks


def _add_services(agent: object, args: argparse.Namespace, settings: object) -> None:
    from tapio.agent.runtime import Agent
    from tapio.agent.settings import AgentSettings

    assert isinstance(agent, Agent) and isinstance(settings, AgentSettings)
    if settings.metrics.enabled:
        from tapio.agent.httpserver import serve_forever

        ms = settings.metrics

        async def metrics_service(a: Agent) -> None:
            await serve_forever(ms, a.readiness)

        agent.options.extra_services.append(metrics_service)
    if args.controller_endpoint:
        from tapio.agent.controller_mode import controller_service

        agent.options.extra_services.append(controller_service(args))
