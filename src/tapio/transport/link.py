"""The agent's link to one controller: endpoint, TLS, identity and the negotiated batching.

The controller client (hello, config poll, heartbeat) and the controller sink (event batches)
talk to the same controller; they share one :class:`ControllerLink` so that what the hello
negotiates (batch size, send interval, registration) applies to the next event batch.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio

from tapio.transport.credentials import BearerToken
from tapio.transport.endpoint import parse_endpoint, tls_for
from tapio.transport.session import client_session

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

DEFAULT_MAX_BATCH_EVENTS: Final = 256
DEFAULT_SEND_INTERVAL_MS: Final = 1000
#: At most one re-registration request per this many seconds (a controller that keeps
#: forgetting the agent must not turn every batch attempt into a hello).
REHELLO_MIN_INTERVAL: Final = 1.0


@dataclass
class ControllerLink:
    """What the controller sink and the controller client share (one per endpoint).

    The client writes the hello-derived batching and the registration state; the sink reads
    them on every batch, so a re-hello that changes ``max_batch_events`` applies to the next
    batch.
    """

    endpoint: URL
    agent_id: str
    node_name: str
    ssl_context: ssl.SSLContext | None = None
    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    send_interval_ms: int = DEFAULT_SEND_INTERVAL_MS
    #: True while the controller is believed to know this agent: set by an accepted hello,
    #: cleared by :meth:`request_rehello` (a ``409 UNKNOWN_AGENT`` answer to a batch, or a
    #: heartbeat answered ``accepted: false``). The sink sends only while it is True.
    registered: bool = False
    #: Set by the sink: why its last batch was given up (None: healthy). Heartbeats report it.
    sink_error: str | None = None
    #: ``--controller-token-file``: sent as ``Authorization: Bearer`` on every request, re-read
    #: when the file changes (a rotated Secret needs no restart).
    token: BearerToken | None = None
    #: Why a re-registration was requested and not yet answered by a hello (None: none pending).
    rehello_reason: str | None = None
    _last_rehello: float = field(default=-1e9, repr=False)
    _rehello_wake: anyio.Event | None = field(default=None, repr=False)

    def request_rehello(self, reason: str) -> bool:
        """Ask the controller client to say hello again (the controller does not know us, e.g.
        it restarted or the request reached another replica) and hold the sink until it has.

        Rate-limited to one request per :data:`REHELLO_MIN_INTERVAL`; returns False when this
        request was folded into a recent one. The hello itself is sent by the one controller
        client session (its backoff bounds the hellos); this only wakes it.
        """
        now = time.monotonic()
        if self.rehello_reason is not None or now - self._last_rehello < REHELLO_MIN_INTERVAL:
            return False
        self._last_rehello = now
        self.rehello_reason = reason
        self.registered = False
        if self._rehello_wake is not None:
            self._rehello_wake.set()
        return True

    async def wait_rehello(self, within: float) -> None:
        """Sleep up to ``within`` seconds, less when a re-registration is requested."""
        if self.rehello_reason is not None:
            return
        self._rehello_wake = anyio.Event()
        with anyio.move_on_after(within):
            await self._rehello_wake.wait()
        self._rehello_wake = None

    async def wait_registered(self, within: float) -> bool:
        """Wait (polling every 20 ms, at most ``within`` seconds) until a hello is accepted;
        True if it was. ``registered`` is a plain flag written by the client, hence the poll."""
        for _ in range(max(1, int(within / 0.02))):
            if self.registered:
                break
            await anyio.sleep(0.02)
        return self.registered

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for the next request (empty without a token)."""
        return self.token.header() if self.token is not None else {}

    def url(self, path: str) -> URL:
        base = self.endpoint.path.rstrip("/")
        return self.endpoint.with_path(base + path).with_query(None).with_fragment(None)

    def apply_batching(self, send_interval_ms: int, max_batch_events: int) -> None:
        # Floors at 1; ceilings keep a hostile answer from creating batches the body limit
        # cannot hold or an interval that parks events for hours.
        self.max_batch_events = max(1, min(int(max_batch_events), 100_000))
        self.send_interval_ms = max(1, min(int(send_interval_ms), 60_000))

    def session(
        self, *, connect_timeout: float, timeout: float, limit: int = 2
    ) -> aiohttp.ClientSession:
        """A client session verifying this controller with the link's TLS context."""
        return client_session(
            ssl_context=self.ssl_context,
            connect_timeout=connect_timeout,
            timeout=timeout,
            limit=limit,
        )


def make_link(
    endpoint: str,
    agent_id: str,
    node_name: str,
    ca_file: str | None = None,
    token_file: str | None = None,
) -> ControllerLink:
    """Validate ``endpoint`` (``http://`` or ``https://``, ``ValueError`` otherwise); an
    ``https://`` endpoint gets a verifying context, against ``ca_file`` only when given
    (``--controller-ca-file``). ``token_file`` is read now (``OSError``/``ValueError`` when it
    is missing or not a token), then again whenever it changes."""
    url = parse_endpoint(endpoint, what="controller")
    token = (
        BearerToken(file=token_file, env=None, what="--controller-token-file")
        if token_file
        else None
    )
    return ControllerLink(
        endpoint=url,
        agent_id=agent_id,
        node_name=node_name,
        ssl_context=tls_for(url, ca_file),
        token=token,
    )
