"""The one way Tapio builds an HTTP client session.

Every outgoing connection (the network sinks, the agent's controller client) goes through
:func:`client_session`, so all of them get the same guarantees: bounded connect and request
timeouts, a bounded connection pool, TLS verified with the given context (never disabled),
and no proxy or credentials picked up from the environment.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # aiohttp's client (and its TLS setup) loads when a session is first built
    import aiohttp

#: Largest response body a client reads by default (the rest is discarded with the connection).
MAX_RESPONSE_BYTES: Final = 64 * 1024


def client_session(
    *,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float,
    timeout: float,
    limit: int = 4,
) -> aiohttp.ClientSession:
    """A session whose every request is bounded: ``connect_timeout`` for TCP + TLS, ``timeout``
    for the whole request and for the longest silence while reading the answer.

    ``ssl_context`` None means the default verifying context (aiohttp's ``ssl=True``).
    """
    import aiohttp

    client_timeout = aiohttp.ClientTimeout(
        total=timeout,
        connect=connect_timeout,
        sock_connect=connect_timeout,
        sock_read=timeout,
    )
    connector = aiohttp.TCPConnector(
        ssl=ssl_context if ssl_context is not None else True, limit=limit, ttl_dns_cache=60
    )
    return aiohttp.ClientSession(connector=connector, timeout=client_timeout, trust_env=False)


async def read_bounded(resp: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """Read at most ``limit`` bytes of a response body."""
    return await resp.content.read(limit)
