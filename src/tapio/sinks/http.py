"""HTTP sink: occurrences POSTed as a JSON array, batched, retried, bounded (docs/sinks.md).

The sink never blocks the drain path, flushes on a timer, retries the *same* batch with backoff
instead of dropping it, and counts every drop in ``tapio_sink_drops_total{sink="http",reason=...}``
(the delivery engine in :mod:`tapio.sinks.delivery`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp

from tapio.occurrence import Occurrence, encode
from tapio.sinks.delivery import DeliverySettings, DeliverySink
from tapio.transport import Attempt, BearerToken, classify_status, parse_endpoint, read_bounded

DEFAULT_PATH = "/v1/occurrences"


class HttpSinkSettings(DeliverySettings, kw_only=True, forbid_unknown_fields=True):
    """The ``[http]`` section of the agent configuration. Every field has a default; the
    delivery knobs (batching, retries, timeouts, ``ca_file``) are :class:`DeliverySettings`.

    ``bearer_token_file`` / ``bearer_token_env`` name where the token lives; the token itself is
    never part of the settings, never logged.
    """

    #: ``http://`` or ``https://`` URL; with no path (or ``/``) the path is ``/v1/occurrences``.
    endpoint: str = "http://localhost:8765"
    #: File holding a bearer token (re-read when it changes, e.g. a projected token).
    bearer_token_file: str | None = None
    #: Environment variable holding a bearer token, e.g. ``TAPIO_HTTP_TOKEN``.
    bearer_token_env: str | None = None

    def __post_init__(self) -> None:
        parse_endpoint(self.endpoint, what="http")
        self.validate_delivery("http")
        if self.bearer_token_file is not None and self.bearer_token_env is not None:
            raise ValueError("http: set bearer_token_file or bearer_token_env, not both")

    def post_url(self) -> str:
        """The URL the batches are POSTed to."""
        url = parse_endpoint(self.endpoint, what="http")
        if url.path in ("", "/"):
            url = url.with_path(DEFAULT_PATH)
        return str(url)


class HttpSink(DeliverySink[bytes]):
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
        super().__init__(settings.delivery_config(url))

    def __repr__(self) -> str:
        return f"HttpSink(url={self._safe_url()!r}, token={self._token!r})"

    def prepare(self, occ: Occurrence, observed_ns: int) -> tuple[bytes, int]:
        raw = encode(occ)
        return raw, len(raw) + 1  # + the separating comma

    async def post(self, session: aiohttp.ClientSession, items: list[bytes]) -> Attempt:
        body = b"[" + b",".join(items) + b"]"
        headers: dict[str, Any] = {"Content-Type": "application/json", **self._token.header()}
        async with session.post(
            self._cfg.url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            await read_bounded(resp)
            return classify_status(resp.status, resp.headers.get("Retry-After"))
