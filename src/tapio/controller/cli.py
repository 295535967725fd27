"""``python -m tapio controller [ADDR] [--listen ADDR] [--profile PATH] ...``.

Exit codes: 0 after a clean SIGTERM/SIGINT shutdown (the forwarding queue drained within
``--drain-grace``), 1 when the profile, the token file or the TLS files are unusable or the
address cannot be bound (start-up refuses rather than serving something nobody asked for),
2 for usage errors. SIGHUP forces a profile reload.

``--config FILE`` (YAML) may hold the same settings as the flags (``forward`` as a list);
flags win, and ``--forward`` URLs are added to the file's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from typing import Any, Final

import structlog
from aiohttp import web

from tapio.controller.app import DEFAULT_STALE_AFTER, Controller
from tapio.controller.auth import TOKEN_FILE_ENV, TokenFile, TokenFileError
from tapio.controller.config import MAX_BATCH_EVENTS
from tapio.controller.evidence import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_EVENTS,
    EvidenceWindow,
)
from tapio.controller.forward import (
    DEFAULT_DRAIN_GRACE,
    DEFAULT_QUEUE_MAX_EVENTS,
    Forwarder,
    ForwardSettings,
    build_output,
)
from tapio.controller.k8s import PodIndex
from tapio.controller.metrics import ControllerMetrics
from tapio.controller.settings import ConfigFileError, apply_config_file
from tapio.logs import configure_logging
from tapio.profile import ProfileError

DEFAULT_LISTEN: Final = "127.0.0.1:8080"
DEFAULT_SCRAPE_INTERVAL: Final = 15.0  # tapio.controller.scheduler.DEFAULT_INTERVAL
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError with a readable reason."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid socket address {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"invalid socket address {text!r}")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid socket address {text!r}")
    return host, int(port_text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tapio controller", description="tapio-wire/v1 controller"
    )
    p.add_argument("addr", nargs="?", help=f"listen address (default {DEFAULT_LISTEN})")
    p.add_argument("--listen", metavar="ADDR", help="listen address, host:port or [v6]:port")
    p.add_argument("--profile", metavar="PATH", help="Evidence Profile YAML (default built-in)")
    p.add_argument(
        "--stale-after",
        metavar="SECONDS",
        type=_positive_float,
        default=DEFAULT_STALE_AFTER,
        help="heartbeat silence after which an agent is reported stale (default 90)",
    )
    p.add_argument("--config", metavar="FILE", help="controller settings file (YAML)")
    p.add_argument(
        "--agent-token-file",
        metavar="FILE",
        default=os.environ.get(TOKEN_FILE_ENV) or None,
        help=f"bearer token agents must present on /v1/* (env {TOKEN_FILE_ENV}); re-read on change",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="serve https with this certificate chain")
    p.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert")
    p.add_argument(
        "--forward",
        metavar="URL",
        action="append",
        default=[],
        help="forward accepted occurrences (nats://HOST:PORT, otlp+http(s)://HOST:PORT, "
        "file:///DIR); repeatable",
    )
    p.add_argument("--queue-max-events", metavar="N", type=_positive_int, default=None)
    p.add_argument("--drain-grace", metavar="SECONDS", type=_positive_float, default=None)
    p.add_argument("--nats-stream", metavar="NAME", default=None)
    p.add_argument("--nats-max-age", metavar="SECONDS", type=_positive_float, default=None)
    p.add_argument("--nats-max-bytes", metavar="BYTES", type=_positive_int, default=None)
    p.add_argument(
        "--kubernetes",
        action="store_true",
        default=None,
        help="enrich occurrences from a Pod watch (in-cluster service account)",
    )
    p.add_argument("--kubeconfig", metavar="FILE", help="like --kubernetes, with this kubeconfig")
    p.add_argument(
        "--pod-label",
        metavar="KEY",
        action="append",
        default=[],
        help="pod label copied into enriched occurrences (repeatable allow-list)",
    )
    w = p.add_argument_group("evidence window (GET /v1/evidence, /mcp)")
    w.add_argument(
        "--evidence-window-max-events",
        metavar="N",
        type=_positive_int,
        default=None,
        help=f"occurrences kept (default {DEFAULT_MAX_EVENTS})",
    )
    w.add_argument(
        "--evidence-window-max-age",
        metavar="SECONDS",
        type=_positive_float,
        default=None,
        help=f"seconds an occurrence is kept after it was accepted (default {DEFAULT_MAX_AGE:g})",
    )
    w.add_argument(
        "--evidence-window-max-bytes",
        metavar="BYTES",
        type=_positive_int,
        default=None,
        help=f"accounted memory of the window (default {DEFAULT_MAX_BYTES})",
    )
    s = p.add_argument_group("scheduler evidence (kube-scheduler metrics)")
    s.add_argument(
        "--scheduler-metrics-url",
        metavar="URL",
        help="scrape this kube-scheduler /metrics (e.g. https://127.0.0.1:10259/metrics)",
    )
    s.add_argument(
        "--scheduler-scrape-interval",
        metavar="SECONDS",
        type=_positive_float,
        default=None,
        help=f"seconds between scrapes (default {DEFAULT_SCRAPE_INTERVAL:g})",
    )
    s.add_argument("--scheduler-ca-file", metavar="FILE", help="CA bundle for the https scrape")
    s.add_argument(
        "--scheduler-token-file",
        metavar="FILE",
        help="bearer token for the scrape (the service account token); re-read on change",
    )
    s.add_argument(
        "--scheduler-insecure-skip-tls-verify",
        action="store_true",
        default=None,
        help="do not verify the scheduler's (often self-signed) serving certificate",
    )
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", choices=tuple(_LEVELS), default="info")
    return p


async def serve(
    controller: Controller,
    host: str,
    port: int,
    on_started: Callable[[list[Any]], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; ``on_started`` gets the bound addresses (port 0 in tests)."""
    log = controller.log
    runner = web.AppRunner(controller.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen", address=f"{host}:{port}", reason=str(exc))
            return 1
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, controller.request_reload)
        active = controller.active
        log.info(
            "controller listening",
            addresses=[list(a) if isinstance(a, tuple) else str(a) for a in runner.addresses],
            profile=str(controller.config.profile_path or "built-in production-default"),
            generation=active.generation,
            config_hash=active.config_hash,
            tls=ssl_context is not None,
            agent_auth=controller.token is not None,
            forward=[lane.output.name for lane in controller.forwarder.lanes]
            if controller.forwarder is not None
            else [],
        )
        if controller.token is None:
            log.warning("no --agent-token-file: /v1 routes accept any client")
        if on_started is not None:
            on_started(list(runner.addresses))
        await stop.wait()
        log.info("controller stopping")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        return 0
    finally:
        await runner.cleanup()


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _fail(message: str) -> int:
    structlog.get_logger("tapio.controller").error("cannot start", reason=message)
    sys.stderr.write(f"tapio controller: {message}\n")
    return 1


def _scheduler(args: argparse.Namespace, metrics: ControllerMetrics, log: Any) -> Any:
    """The scheduler monitor the flags ask for (None without --scheduler-metrics-url)."""
    if args.scheduler_metrics_url is None:
        for flag in ("scheduler_ca_file", "scheduler_token_file", "scheduler_scrape_interval"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --scheduler-metrics-url")
        return None
    from tapio.controller.scheduler import SchedulerMonitor, ScrapeSettings

    settings = ScrapeSettings(
        url=args.scheduler_metrics_url,
        interval=args.scheduler_scrape_interval or DEFAULT_SCRAPE_INTERVAL,
        ca_file=args.scheduler_ca_file,
        insecure_skip_verify=bool(args.scheduler_insecure_skip_tls_verify),
    )
    token = None
    if args.scheduler_token_file is not None:
        token = TokenFile(args.scheduler_token_file, logger=log, name="scheduler token")
    return SchedulerMonitor(settings, metrics, log, token=token)


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.addr is not None and args.listen is not None:
        parser.print_usage(sys.stderr)
        sys.stderr.write("error: give the listen address once (positional ADDR or --listen)\n")
        return 2
    if args.config is not None:
        try:
            apply_config_file(args, args.config)
        except ConfigFileError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        sys.stderr.write("error: --tls-cert and --tls-key go together\n")
        return 2
    try:
        host, port = parse_address(args.listen or args.addr or DEFAULT_LISTEN)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    configure_logging(args.log_format, args.log_level)  # shared with the agent (tapio.logs)
    log = structlog.get_logger("tapio.controller")
    settings = ForwardSettings(
        **{
            k: v
            for k, v in {
                "nats_stream": args.nats_stream,
                "nats_max_age": args.nats_max_age,
                "nats_max_bytes": args.nats_max_bytes,
            }.items()
            if v is not None
        }
    )
    try:
        outputs = [build_output(url, settings, log) for url in args.forward]
    except ValueError as exc:
        sys.stderr.write(f"error: --forward: {exc}\n")
        return 2
    try:
        token = TokenFile(args.agent_token_file, logger=log) if args.agent_token_file else None
    except TokenFileError as exc:
        return _fail(str(exc))
    ssl_context = None
    if args.tls_cert is not None:
        try:
            ssl_context = _tls_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            return _fail(f"cannot load --tls-cert/--tls-key: {exc}")
    if args.queue_max_events is not None and args.queue_max_events < MAX_BATCH_EVENTS:
        # a batch larger than the queue could never be accepted: 503 forever
        sys.stderr.write(f"error: --queue-max-events must be at least {MAX_BATCH_EVENTS}\n")
        return 2
    metrics = ControllerMetrics()
    watcher = None
    if args.kubernetes or args.kubeconfig:
        from tapio.controller.k8s.watch import PodWatcher  # the client is big: load on demand

        watcher = PodWatcher(
            PodIndex(label_allowlist=args.pod_label), metrics, log, kubeconfig=args.kubeconfig
        )
    try:
        forwarder = (
            Forwarder(
                outputs,
                metrics,
                log,
                queue_max_events=args.queue_max_events or DEFAULT_QUEUE_MAX_EVENTS,
                drain_grace=args.drain_grace or DEFAULT_DRAIN_GRACE,
            )
            if outputs
            else None
        )
    except ValueError as exc:
        sys.stderr.write(f"error: --forward: {exc}\n")
        return 2
    try:
        scheduler = _scheduler(args, metrics, log)
    except (ValueError, TokenFileError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    window = EvidenceWindow(
        max_events=args.evidence_window_max_events or DEFAULT_MAX_EVENTS,
        max_age=args.evidence_window_max_age or DEFAULT_MAX_AGE,
        max_bytes=args.evidence_window_max_bytes or DEFAULT_MAX_BYTES,
        metrics=metrics,
    )
    try:
        controller = Controller(
            profile_path=args.profile,
            stale_after=args.stale_after,
            token=token,
            metrics=metrics,
            forwarder=forwarder,
            pod_watcher=watcher,
            window=window,
            scheduler=scheduler,
        )
    except ProfileError as exc:
        log.error("invalid profile", reason=str(exc))
        sys.stderr.write(f"tapio controller: invalid profile: {exc}\n")
        return 1
    return asyncio.run(serve(controller, host, port, ssl_context=ssl_context))
