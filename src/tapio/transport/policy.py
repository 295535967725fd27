"""When to try a request again and how long to wait: the retry policy of every Tapio client.

An attempt ends in one of four outcomes (:class:`Attempt`): delivered, worth retrying
(transport errors, timeouts, ``408``, ``429``, any ``5xx``), refused for good (other ``4xx`` and
``3xx``: redirects are never followed) or a TLS failure (final: TLS never downgrades and a
certificate does not fix itself). Waits are jittered exponential backoff; a server's
``Retry-After`` replaces the backoff for one wait but never exceeds the cap, so a receiver
cannot park a client for hours.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Literal


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

    ``retry`` is 0 for the first retry. Half of the wait is fixed so retries never bunch up at
    zero; the other half is random so many clients do not retry in lock step.
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
    ``cap``), else jittered exponential backoff."""
    if retry_after is not None:
        return min(cap, max(0.0, retry_after))
    return backoff_delay(retry, base, cap, rand)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often one request is retried and how long each wait is."""

    #: Retries after the first attempt (so at most ``max_retries + 1`` attempts).
    max_retries: int
    #: First backoff ceiling, doubled per retry.
    base: float
    #: Largest wait; also bounds ``Retry-After``.
    cap: float

    def delay(
        self,
        retry: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        return retry_delay(retry, self.base, self.cap, retry_after, rand)


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one delivery attempt."""

    outcome: Literal["ok", "retry", "rejected", "tls_error"]
    detail: str
    retry_after: float | None = None
    #: Items refused by the receiver inside a successful answer (OTLP partial success).
    rejected_items: int = 0


def classify_status(status: int, retry_after_header: str | None) -> Attempt:
    """2xx delivered; 408, 429 and 5xx retried (with ``Retry-After``); anything else final."""
    if 200 <= status < 300:
        return Attempt("ok", f"HTTP {status}")
    if status in (408, 429) or status >= 500:
        return Attempt("retry", f"HTTP {status}", parse_retry_after(retry_after_header))
    return Attempt("rejected", f"HTTP {status}")


def classify_exception(exc: BaseException) -> Attempt:
    """TLS failures are final (never downgraded, retrying will not fix a certificate); every other
    transport error or timeout is retried."""
    import aiohttp  # loaded already: only an aiohttp request produces the exceptions seen here

    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return Attempt("tls_error", describe_exc(exc))
    return Attempt("retry", describe_exc(exc))


def describe_exc(exc: BaseException) -> str:
    """``Type: message`` for logs (transport exceptions never carry request headers)."""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
