"""Delivery machinery shared by the network sinks (HTTP and OTLP).

:class:`BufferedNetworkSink` turns the sink contract (``run()`` consuming a stream of batches)
into bounded, retried network delivery:

* ``run()`` only ever *receives*: every occurrence is prepared (encoded) once and appended to a
  bounded in-memory buffer. When the buffer is full the oldest buffered occurrences are dropped and
  counted (``reason="buffer_full"``). The receiving loop never awaits the network, so a dead or
  slow receiver can never stop the sink from accepting (and counting) batches.
* A sender task takes batches out of the buffer, bounded by count, by bytes and by time (the
  oldest buffered occurrence never waits longer than ``flush_interval_secs``), and POSTs them.
* A failed attempt (transport error, timeout, HTTP 429 or 5xx) is retried with exponential backoff
  and jitter, honouring ``Retry-After``; the *same* batch is re-sent, so the sink itself never
  creates duplicates and never loses an occurrence unless the buffer overflows or the retries are
  exhausted (``reason="retries_exhausted"``). Other 4xx answers are final (``reason="rejected"``);
  a TLS failure (e.g. certificate verification) is final too (``reason="tls_error"``): TLS never
  downgrades.
* On shutdown (the stream closes) the sender flushes everything immediately, within
  ``shutdown_timeout_secs``; whatever is still held then is counted (``reason="shutdown"``).
"""

from __future__ import annotations

import abc
import email.utils
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Generic, Literal, Protocol, TypeVar

import aiohttp
import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from yarl import URL

from tapio.metrics import SINK_QUEUE_DEPTH, SINK_RETRIES
from tapio.occurrence import Occurrence
from tapio.sinks.base import Batch, Sink

log = structlog.get_logger("tapio.sinks")

T = TypeVar("T")

#: Largest response body a sink reads (the rest is discarded with the connection).
MAX_RESPONSE_BYTES = 64 * 1024

_FORBIDDEN_HEADER_CHARS = ("\r", "\n", "\0")
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class Secret:
    """A credential that never shows itself in ``repr``/``str`` (and therefore in logs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def check_header(name: str, value: str, *, what: str) -> None:
    """Reject header names that are not HTTP tokens and values with CR, LF or NUL (injection)."""
    if not name or any(ch not in _TOKEN_CHARS for ch in name):
        raise ValueError(f"{what}: invalid header name {name!r}")
    if any(ch in value for ch in _FORBIDDEN_HEADER_CHARS):
        # Never echo the value: it is usually a credential.
        raise ValueError(f"{what}: header {name!r} contains CR, LF or NUL")


def parse_endpoint(endpoint: str, *, what: str) -> URL:
    """Validate an ``http://`` or ``https://`` URL with a host (hostnames resolve normally)."""
    text = endpoint.strip()
    if not text:
        raise ValueError(f"{what}: endpoint must not be empty")
    try:
        url = URL(text)
    except ValueError as exc:
        raise ValueError(f"{what}: invalid endpoint {text!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"{what}: endpoint must start with http:// or https://, got {text!r}")
    if not url.host:
        raise ValueError(f"{what}: endpoint {text!r} has no host")
    if url.user is not None or url.password is not None:
        raise ValueError(f"{what}: credentials in the endpoint URL are not allowed")
    return url


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: the system trust store, or only ``ca_file`` when given.

    Hostname checking and certificate verification stay on; there is no option to turn them off.
    """
    if ca_file is not None:
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def backoff_delay(
    retry: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with "equal jitter": uniform in [d/2, d] where d = min(cap, base*2^n).

    ``retry`` is 0 for the first retry.
    """
    ceiling = min(cap, base * (2.0 ** min(retry, 62)))
    return ceiling / 2.0 + rand() * ceiling / 2.0


def retry_delay(
    retry: int,
    base: float,
    cap: float,
    retry_after: float | None,
    rand: Callable[[], float] = random.random,
) -> float:
    """The wait before the next attempt: the server's ``Retry-After`` when it sent one (bounded by
    ``cap`` so a receiver cannot park the sink for hours), else jittered exponential backoff."""
    if retry_after is not None:
        return min(cap, max(0.0, retry_after))
    return backoff_delay(retry, base, cap, rand)


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one delivery attempt."""

    outcome: Literal["ok", "retry", "rejected", "tls_error"]
    detail: str
    retry_after: float | None = None
    #: Items refused by the receiver inside a successful answer (OTLP partial success).
    rejected_items: int = 0


def classify_status(status: int, retry_after_header: str | None) -> Attempt:
    """2xx delivered; 429 and 5xx retried (with ``Retry-After``); anything else is final."""
    if 200 <= status < 300:
        return Attempt("ok", f"HTTP {status}")
    if status == 429 or status >= 500:
        return Attempt("retry", f"HTTP {status}", parse_retry_after(retry_after_header))
    return Attempt("rejected", f"HTTP {status}")


def classify_exception(exc: BaseException) -> Attempt:
    """TLS failures are final (never downgraded, retrying will not fix a certificate); every other
    transport error or timeout is retried."""
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return Attempt("tls_error", _describe_exc(exc))
    return Attempt("retry", _describe_exc(exc))


def _describe_exc(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


async def read_bounded(resp: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """Read at most ``limit`` bytes of a response body."""
    return await resp.content.read(limit)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The knobs of :class:`BufferedNetworkSink`, derived from a sink's settings."""

    url: URL
    batch_size: int
    max_batch_bytes: int
    flush_interval: float
    buffer_max_events: int
    max_retries: int
    backoff_base: float
    backoff_max: float
    connect_timeout: float
    timeout: float
    shutdown_timeout: float
    ssl_context: ssl.SSLContext | None


class DeliverySettings(Protocol):
    """The delivery knobs every batching network sink's settings carry (HTTP, OTLP)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def max_batch_bytes(self) -> int: ...
    @property
    def flush_interval_secs(self) -> float: ...
    @property
    def buffer_max_events(self) -> int: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def backoff_base_secs(self) -> float: ...
    @property
    def backoff_max_secs(self) -> float: ...
    @property
    def connect_timeout_secs(self) -> float: ...
    @property
    def timeout_secs(self) -> float: ...
    @property
    def shutdown_timeout_secs(self) -> float: ...
    @property
    def ca_file(self) -> str | None: ...


def validate_delivery(what: str, s: DeliverySettings) -> None:
    """Range checks shared by the HTTP and OTLP settings (``ValueError`` with the field name)."""
    if s.batch_size < 1:
        raise ValueError(f"{what}.batch_size must be >= 1")
    if s.max_batch_bytes < 1024:
        raise ValueError(f"{what}.max_batch_bytes must be >= 1024")
    if not 0 < s.flush_interval_secs <= 3600:
        raise ValueError(f"{what}.flush_interval_secs must be in (0, 3600]")
    if s.buffer_max_events < s.batch_size:
        raise ValueError(f"{what}.buffer_max_events must be >= batch_size")
    if not 0 <= s.max_retries <= 100:
        raise ValueError(f"{what}.max_retries must be in [0, 100]")
    if not 0 < s.backoff_base_secs <= s.backoff_max_secs <= 3600:
        raise ValueError(f"{what}: need 0 < backoff_base_secs <= backoff_max_secs <= 3600")
    if not 0 < s.connect_timeout_secs <= 600:
        raise ValueError(f"{what}.connect_timeout_secs must be in (0, 600]")
    if not 0 < s.timeout_secs <= 600:
        raise ValueError(f"{what}.timeout_secs must be in (0, 600]")
    if not 0 < s.shutdown_timeout_secs <= 600:
        raise ValueError(f"{what}.shutdown_timeout_secs must be in (0, 600]")


def delivery_config(url: URL, s: DeliverySettings) -> DeliveryConfig:
    """The sink's knobs from its settings; an ``https`` URL gets a verifying TLS context."""
    return DeliveryConfig(
        url=url,
        batch_size=s.batch_size,
        max_batch_bytes=s.max_batch_bytes,
        flush_interval=s.flush_interval_secs,
        buffer_max_events=s.buffer_max_events,
        max_retries=s.max_retries,
        backoff_base=s.backoff_base_secs,
        backoff_max=s.backoff_max_secs,
        connect_timeout=s.connect_timeout_secs,
        timeout=s.timeout_secs,
        shutdown_timeout=s.shutdown_timeout_secs,
        ssl_context=make_ssl_context(s.ca_file) if url.scheme == "https" else None,
    )


class _Item(Generic[T]):
    __slots__ = ("arrived", "payload", "size")

    def __init__(self, payload: T, size: int, arrived: float) -> None:
        self.payload = payload
        self.size = size
        self.arrived = arrived


class BufferedNetworkSink(Sink, Generic[T], abc.ABC):
    """Bounded buffer + sender task + retries; subclasses encode and POST (see module docs)."""

    def __init__(self, config: DeliveryConfig) -> None:
        super().__init__()
        self._cfg = config
        self._buf: deque[_Item[T]] = deque()
        self._buf_bytes = 0
        self._inflight = 0
        self._closing = False
        self._wake = anyio.Event()
        self._depth = SINK_QUEUE_DEPTH.labels(sink=self.name)
        self._retries = SINK_RETRIES.labels(sink=self.name)
        self._depth.set(0)
        self._last_overflow_log = 0.0
        #: Why the last batch was given up, until a later batch is delivered (None: healthy).
        self.last_error: str | None = None

    # -- subclass hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[T, int]:
        """Encode one occurrence once, on arrival; return the payload and its size in bytes."""

    @abc.abstractmethod
    async def post(self, session: aiohttp.ClientSession, items: list[T]) -> Attempt:
        """One delivery attempt of ``items``; transport exceptions may propagate."""

    # -- introspection (tests, health) ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False from a batch given up (rejected, TLS, retries exhausted) until the next
        delivery succeeds; for the agent's readiness (``/readyz``)."""
        return self.last_error is None

    @property
    def held(self) -> int:
        """Occurrences buffered or in flight."""
        return len(self._buf) + self._inflight

    def _safe_url(self) -> str:
        return str(self._cfg.url.with_query(None).with_fragment(None))

    @property
    def _log(self) -> Any:
        # Bound per use (logging is rare here) so a structlog configuration made after the
        # sink was constructed still applies.
        return log.bind(sink=self.name, endpoint=self._safe_url())

    # -- the contract --------------------------------------------------------------------------

    async def run(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        cfg = self._cfg
        timeout = aiohttp.ClientTimeout(
            total=cfg.timeout,
            connect=cfg.connect_timeout,
            sock_connect=cfg.connect_timeout,
            sock_read=cfg.timeout,
        )
        connector = aiohttp.TCPConnector(
            ssl=cfg.ssl_context if cfg.ssl_context is not None else True,
            limit=4,
            ttl_dns_cache=60,
        )
        session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False, auto_decompress=True
        )
        done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender, session, done)
                try:
                    async with batches:
                        async for batch in batches:
                            self._accept(batch)
                finally:
                    self._closing = True
                    self._wake.set()
                with anyio.move_on_after(cfg.shutdown_timeout):
                    await done.wait()
                tg.cancel_scope.cancel()
        finally:
            leftover = self.held
            if leftover:
                self.stats.drop("shutdown", leftover)
                self.stats.err(leftover)
                self._log.warning("sink shutdown with undelivered occurrences", dropped=leftover)
                self._buf.clear()
                self._buf_bytes = 0
                self._inflight = 0
            self._depth.set(0)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await session.close()

    # -- receiving side: never awaits ----------------------------------------------------------

    def _accept(self, batch: Batch) -> None:
        if not batch:
            return
        observed_ns = time.time_ns()
        now = anyio.current_time()
        buf = self._buf
        was_empty = not buf
        for occ in batch:
            try:
                payload, size = self.prepare(occ, observed_ns)
            except Exception as exc:  # a malformed occurrence must not poison the batch
                self.stats.drop("encode_error")
                self.stats.err()
                self._log.warning("occurrence could not be encoded", error=_describe_exc(exc))
                continue
            buf.append(_Item(payload, size, now))
            self._buf_bytes += size
        overflow = len(buf) + self._inflight - self._cfg.buffer_max_events
        if overflow > 0:
            overflow = min(overflow, len(buf))
            for _ in range(overflow):
                self._buf_bytes -= buf.popleft().size
            self.stats.drop("buffer_full", overflow)
            self.stats.err(overflow)
            if now - self._last_overflow_log >= 10.0:
                self._last_overflow_log = now
                self._log.warning("sink buffer full, dropping oldest occurrences", dropped=overflow)
        self._depth.set(self.held)
        full = len(buf) >= self._cfg.batch_size or self._buf_bytes >= self._cfg.max_batch_bytes
        if buf and (full or was_empty):  # a batch is ready, or a new flush deadline starts
            self._wake.set()

    # -- sending side --------------------------------------------------------------------------

    async def _wait(self, delay: float | None) -> None:
        with anyio.move_on_after(delay):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = anyio.Event()

    def _ready_to_send(self) -> float | None:
        """None when a batch should go now, else the seconds until the oldest item's deadline."""
        if self._closing:
            return None
        if len(self._buf) >= self._cfg.batch_size or self._buf_bytes >= self._cfg.max_batch_bytes:
            return None
        remaining = self._buf[0].arrived + self._cfg.flush_interval - anyio.current_time()
        return remaining if remaining > 0 else None

    def _take(self) -> list[T]:
        items: list[T] = []
        total = 0
        buf = self._buf
        limit_n, limit_b = self._cfg.batch_size, self._cfg.max_batch_bytes
        while buf and len(items) < limit_n:
            head = buf[0]
            if items and total + head.size > limit_b:
                break
            buf.popleft()
            items.append(head.payload)
            total += head.size
        self._buf_bytes -= total
        self._inflight = len(items)
        return items

    async def _sender(self, session: aiohttp.ClientSession, done: anyio.Event) -> None:
        try:
            while True:
                if not self._buf:
                    if self._closing:
                        return
                    await self._wait(None)
                    continue
                remaining = self._ready_to_send()
                if remaining is not None:
                    await self._wait(remaining)
                    continue
                items = self._take()
                await self._deliver(session, items)
                # Completed normally (delivered or counted): nothing is in flight any more.
                self._inflight = 0
                self._depth.set(self.held)
        finally:
            done.set()

    async def _deliver(self, session: aiohttp.ClientSession, items: list[T]) -> None:
        n = len(items)
        cfg = self._cfg
        retry = 0
        while True:
            try:
                attempt = await self.post(session, items)
            except Exception as exc:  # transport errors, timeouts, token file trouble
                attempt = classify_exception(exc)
            if attempt.outcome == "ok":
                delivered = n - min(n, attempt.rejected_items)
                self.stats.ok(delivered)
                self.last_error = None
                if attempt.rejected_items:
                    self.stats.drop("rejected", n - delivered)
                    self.stats.err(n - delivered)
                    self._log.warning(
                        "receiver rejected part of a batch", rejected=n - delivered, batch=n
                    )
                return
            if attempt.outcome in ("rejected", "tls_error"):
                self.last_error = f"{attempt.outcome}: {attempt.detail}"
                self.stats.drop(attempt.outcome, n)
                self.stats.err(n)
                self._log.error(
                    "batch dropped", reason=attempt.outcome, detail=attempt.detail, batch=n
                )
                return
            if retry >= cfg.max_retries:
                self.last_error = f"retries_exhausted: {attempt.detail}"
                self.stats.drop("retries_exhausted", n)
                self.stats.err(n)
                self._log.error(
                    "batch dropped after retries",
                    reason="retries_exhausted",
                    detail=attempt.detail,
                    attempts=retry + 1,
                    batch=n,
                )
                return
            delay = retry_delay(
                retry, cfg.backoff_base, cfg.backoff_max, attempt.retry_after, random.random
            )
            self._retries.inc()
            self._log.warning(
                "delivery failed, retrying",
                detail=attempt.detail,
                retry_in_secs=round(delay, 3),
                attempt=retry + 1,
                batch=n,
            )
            await anyio.sleep(delay)
            retry += 1


class BearerToken:
    """A bearer token from a file (re-read when it changes: rotated tokens work) or from an
    environment variable (read once). The value only ever lives inside a :class:`Secret`."""

    def __init__(self, *, file: str | None, env: str | None, what: str) -> None:
        if file is not None and env is not None:
            raise ValueError(f"{what}: set bearer_token_file or bearer_token_env, not both")
        self._file = file
        self._what = what
        self._stamp: tuple[int, int] | None = None
        self._value: Secret | None = None
        if env is not None:
            raw = os.environ.get(env)
            if raw is None or not raw.strip():
                raise ValueError(f"{what}: environment variable {env} is not set or empty")
            self._value = self._check(raw)
        elif file is not None:
            self.get()  # fail at start-up when the file is missing or malformed

    def _check(self, raw: str) -> Secret:
        value = raw.strip()
        if not value:
            raise ValueError(f"{self._what}: bearer token is empty")
        if any(ch in value for ch in _FORBIDDEN_HEADER_CHARS) or any(ord(c) < 0x20 for c in value):
            raise ValueError(f"{self._what}: bearer token contains control characters")
        return Secret(value)

    def get(self) -> Secret | None:
        """The current token (None when none is configured); raises OSError/ValueError."""
        if self._file is None:
            return self._value
        st = os.stat(self._file)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp or self._value is None:
            with open(self._file, encoding="utf-8") as fh:
                raw = fh.read(64 * 1024)
            self._value = self._check(raw)
            self._stamp = stamp
        return self._value

    def __repr__(self) -> str:
        source = f"file={self._file!r}" if self._file else "env"
        return f"BearerToken({source}, value=***)"


def redacted_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return dict.fromkeys(headers, "***")
