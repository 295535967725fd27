"""Scraping kube-scheduler's ``/metrics`` every ``--scheduler-scrape-interval`` seconds.

A real kube-scheduler serves its metrics on https port 10259 and asks for a bearer token it
can authorize (the controller's service account token, which Kubernetes rotates, so the file is
re-read on change with the same :class:`~tapio.controller.auth.TokenFile` the agent token uses).
Its serving certificate is often self-signed; ``--scheduler-ca-file`` verifies it against a CA,
``--scheduler-insecure-skip-tls-verify`` is the explicit opt-out.

Every scrape is bounded: a total timeout (at most the interval, at most 10 s), a body limit
(``MAX_BODY_BYTES``), no redirects (a redirect must not carry the token elsewhere). A failure
(connect, timeout, HTTP status, body too large, unparsable page) is counted by reason in
``tapio_controller_scheduler_scrapes_total``, shown in ``/readyz`` detail and logged once per
new reason; it is never an occurrence, and it neither starts nor clears a condition.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tapio.controller.auth import TokenFile
from tapio.controller.forward.record import Record, record_of
from tapio.controller.metrics import ControllerMetrics
from tapio.controller.scheduler.exposition import ExpositionError, parse
from tapio.controller.scheduler.judge import SchedulerJudge
from tapio.profile import SchedulerThresholds

DEFAULT_INTERVAL: Final = 15.0
MAX_TIMEOUT: Final = 10.0
#: A kube-scheduler page is a few hundred KiB; anything past this is not one.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: Occurrences held while the forwarding queue is full, retried after each scrape.
MAX_PENDING: Final = 64

Emit = Callable[[Sequence[Record]], bool]
"""Hands records to the forwarding queue and the evidence window; False: queue full."""


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    url: str
    interval: float = DEFAULT_INTERVAL
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    max_body_bytes: int = MAX_BODY_BYTES

    @property
    def timeout(self) -> float:
        return min(self.interval, MAX_TIMEOUT)

    @property
    def display_url(self) -> str:
        """The URL without userinfo, query or fragment (safe to log and to show)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def validate_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--scheduler-metrics-url must be an http:// or https:// URL with a host")


class ScrapeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SchedulerMonitor:
    """The scrape loop, its judges and its health; owned by the controller app."""

    def __init__(
        self,
        settings: ScrapeSettings,
        metrics: ControllerMetrics,
        log: Any,
        *,
        token: TokenFile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        validate_url(settings.url)
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self.token = token
        self.clock = clock
        self.judge = SchedulerJudge()
        self.pending: deque[Record] = deque()
        self.scrapes_ok = 0
        self.consecutive_failures = 0
        self.last_error = ""
        self.last_success_unix: float | None = None
        self._thresholds: SchedulerThresholds | None = None
        metrics.scheduler_up.set(0)

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.settings.url.lower().startswith("https:"):
            return True
        if self.settings.insecure_skip_verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=self.settings.ca_file)

    def health(self) -> dict[str, Any]:
        """What ``/readyz`` shows (the scheduler does not decide readiness)."""
        return {
            "url": self.settings.display_url,
            "up": self.consecutive_failures == 0 and self.scrapes_ok > 0,
            "scrapes_ok": self.scrapes_ok,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error or None,
            "last_success_unix": self.last_success_unix,
        }

    async def fetch(self, session: aiohttp.ClientSession) -> str:
        headers = {"Accept": "text/plain;version=0.0.4"}
        if self.token is not None:
            headers["Authorization"] = "Bearer " + self.token.current().decode()
        limit = self.settings.max_body_bytes
        try:
            async with session.get(
                self.settings.url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            ) as resp:
                if resp.status != 200:
                    raise ScrapeError("http_status", f"HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise ScrapeError("too_large", f"body larger than {limit} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65_536):
                    body += chunk
                    if len(body) > limit:
                        raise ScrapeError("too_large", f"body larger than {limit} bytes")
        except TimeoutError:
            raise ScrapeError("timeout", f"no answer within {self.settings.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise ScrapeError("connect", f"{type(exc).__name__}") from None
        except ssl.SSLError as exc:
            raise ScrapeError("connect", f"TLS: {exc.reason or type(exc).__name__}") from None
        return body.decode("utf-8", "replace")

    def _failed(self, reason: str, detail: str) -> None:
        self.metrics.scheduler_scrapes.labels(reason).inc()
        self.metrics.scheduler_up.set(0)
        self.consecutive_failures += 1
        message = f"{reason}: {detail}"
        if message != self.last_error:
            self.log.warning(
                "scheduler scrape failed", url=self.settings.display_url, reason=message
            )
        self.last_error = message

    def _flush(self, emit: Emit) -> None:
        while self.pending:
            batch = list(self.pending)
            if not emit(batch):
                return
            self.pending.clear()

    def _hold(self, records: list[Record]) -> None:
        for rec in records:
            if len(self.pending) >= MAX_PENDING:
                self.pending.popleft()
                self.metrics.scheduler_evidence_dropped.inc()
                self.log.error("scheduler occurrence dropped: forwarding queue full")
            self.pending.append(rec)

    async def scrape_once(
        self, session: aiohttp.ClientSession, thresholds: SchedulerThresholds, emit: Emit
    ) -> list[Record]:
        """One scrape and judgement; returns the records of the conditions that started."""
        if thresholds != self._thresholds:
            if self._thresholds is not None:
                self.judge.reset()  # new thresholds: re-judge from a clean state
            self._thresholds = thresholds
        self._flush(emit)
        try:
            text = await self.fetch(session)
            snap = parse(text, self.clock())
        except (ScrapeError, ExpositionError) as exc:
            self._failed(exc.reason, str(exc))
            return []
        self.metrics.scheduler_scrapes.labels("ok").inc()
        self.metrics.scheduler_up.set(1)
        if self.consecutive_failures:
            self.log.info("scheduler scrape recovered", url=self.settings.display_url)
        self.consecutive_failures = 0
        self.last_error = ""
        self.scrapes_ok += 1
        self.last_success_unix = time.time()
        records = [record_of(doc) for doc in self.judge.step(snap, thresholds)]
        for rec in records:
            self.metrics.scheduler_occurrences.labels(rec.type).inc()
            self.log.info("scheduler condition started", type=rec.type, id=rec.id)
        if records:
            self._hold(records)
            self._flush(emit)
        return records

    async def run(self, thresholds: Callable[[], SchedulerThresholds], emit: Emit) -> None:
        """Scrape until cancelled, one scrape per interval (a slow scrape delays the next)."""
        connector = aiohttp.TCPConnector(ssl=self.ssl_context(), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                started = self.clock()
                try:
                    await self.scrape_once(session, thresholds(), emit)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # keep scraping whatever happened
                    self._failed("error", type(exc).__name__)
                    self.log.exception("scheduler scrape crashed")
                elapsed = self.clock() - started
                await asyncio.sleep(max(0.0, self.settings.interval - elapsed))
