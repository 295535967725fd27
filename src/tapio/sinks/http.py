"""HTTP sink: occurrences POSTed as a JSON array, batched, retried, bounded (docs/sinks.md).

Unlike the reference (reference.md §5, §13 item 12) the sink never blocks the drain path, flushes
on a timer, retries the *same* batch with backoff instead of dropping it, and counts every drop in
``tapio_sink_drops_total{sink="http",reason=...}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp
import msgspec

from tapio.occurrence import Occurrence, encode
from tapio.sinks._retry import (
    Attempt,
    BearerToken,
    BufferedNetworkSink,
    classify_status,
    delivery_config,
    parse_endpoint,
    read_bounded,
    validate_delivery,
)

DEFAULT_PATH = "/v1/occurrences"


class HttpSinkSettings(msgspec.Struct, kw_only=True):
    """The ``[http]`` section of the agent configuration. Every field has a default.

    Durations are seconds (floats accepted). ``bearer_token_file`` / ``bearer_token_env`` name
    where the token lives; the token itself is never part of the settings, never logged.
    """

    #: ``http://`` or ``https://`` URL; with no path (or ``/``) the path is ``/v1/occurrences``.
    endpoint: str = "http://localhost:8765"
    #: At most this many occurrences per POST.
    batch_size: int = 100
    #: At most this many bytes of JSON per POST (a single larger occurrence is sent alone).
    max_batch_bytes: int = 1024 * 1024
    #: The oldest buffered occurrence is sent at the latest after this long.
    flush_interval_secs: float = 1.0
    #: Occurrences held (buffered + in flight); beyond it the oldest are dropped (``buffer_full``).
    buffer_max_events: int = 10_000
    #: Retries of one batch after the first attempt (429, 5xx, transport errors, timeouts).
    max_retries: int = 5
    #: Exponential backoff: base * 2^n with equal jitter, capped (also caps ``Retry-After``).
    backoff_base_secs: float = 0.5
    backoff_max_secs: float = 30.0
    #: TCP (and TLS) connect timeout.
    connect_timeout_secs: float = 5.0
    #: Whole-request timeout, also the timeout between two reads of the response.
    timeout_secs: float = 10.0
    #: Grace period for the final flush when the agent stops.
    shutdown_timeout_secs: float = 4.0
    #: PEM CA bundle used *instead of* the system store to verify an ``https://`` endpoint.
    ca_file: str | None = None
    #: File holding a bearer token (re-read when it changes, e.g. a projected token).
    bearer_token_file: str | None = None
    #: Environment variable holding a bearer token, e.g. ``TAPIO_HTTP_TOKEN``.
    bearer_token_env: str | None = None

    def __post_init__(self) -> None:
        parse_endpoint(self.endpoint, what="http")
        validate_delivery("http", self)
        if self.bearer_token_file is not None and self.bearer_token_env is not None:
            raise ValueError("http: set bearer_token_file or bearer_token_env, not both")

    def post_url(self) -> str:
        """The URL the batches are POSTed to."""
        url = parse_endpoint(self.endpoint, what="http")
        if url.path in ("", "/"):
            url = url.with_path(DEFAULT_PATH)
        return str(url)


class HttpSink(BufferedNetworkSink[bytes]):
    """Batched JSON POSTs (``Content-Type: application/json``, body ``[occ, occ, ...]``).

    Construction fails (``ValueError``/``OSError``/``ssl.SSLError``) on a bad ``ca_file`` or a
    missing token, so misconfiguration is a start-up error, not a silent drop.
    """

    name: ClassVar[str] = "http"

    def __init__(self, settings: HttpSinkSettings) -> None:
        self.settings = settings
        url = parse_endpoint(settings.post_url(), what="http")
        self._token = BearerToken(
            file=settings.bearer_token_file, env=settings.bearer_token_env, what="http"
        )
        super().__init__(delivery_config(url, settings))

    def __repr__(self) -> str:
        return f"HttpSink(url={self._safe_url()!r}, token={self._token!r})"

    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[bytes, int]:
        raw = encode(occ)
        return raw, len(raw) + 1  # + the separating comma

    async def post(self, session: aiohttp.ClientSession, items: list[bytes]) -> Attempt:
        body = b"[" + b",".join(items) + b"]"
        headers: dict[str, Any] = {"Content-Type": "application/json"}
        token = self._token.get()
        if token:
            headers["Authorization"] = "Bearer " + token.reveal()
        async with session.post(
            self._cfg.url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            await read_bounded(resp)
            return classify_status(resp.status, resp.headers.get("Retry-After"))
