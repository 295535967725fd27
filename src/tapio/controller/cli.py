"""``python -m tapio controller [ADDR] [--listen ADDR] [--profile PATH] ...``.

Exit codes: 0 after a clean SIGTERM/SIGINT shutdown, 1 when the profile is invalid or the
address cannot be bound (start-up refuses rather than serving a config nobody asked for),
2 for usage errors. SIGHUP forces a profile reload.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, Final

import structlog
from aiohttp import web

from tapio.controller.app import DEFAULT_STALE_AFTER, Controller
from tapio.logs import configure_logging
from tapio.profile import ProfileError

DEFAULT_LISTEN: Final = "127.0.0.1:8080"
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
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", choices=tuple(_LEVELS), default="info")
    return p


async def serve(
    controller: Controller,
    host: str,
    port: int,
    on_started: Callable[[list[Any]], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; ``on_started`` gets the bound addresses (port 0 in tests)."""
    log = controller.log
    runner = web.AppRunner(controller.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
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
        )
        if on_started is not None:
            on_started(list(runner.addresses))
        await stop.wait()
        log.info("controller stopping")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        return 0
    finally:
        await runner.cleanup()


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
    try:
        host, port = parse_address(args.listen or args.addr or DEFAULT_LISTEN)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    configure_logging(args.log_format, args.log_level)  # shared with the agent (tapio.logs)
    try:
        controller = Controller(profile_path=args.profile, stale_after=args.stale_after)
    except ProfileError as exc:
        structlog.get_logger("tapio.controller").error("invalid profile", reason=str(exc))
        sys.stderr.write(f"tapio controller: invalid profile: {exc}\n")
        return 1
    return asyncio.run(serve(controller, host, port))
