"""How Tapio talks HTTP to the outside: endpoints, TLS, credentials, retries and sessions.

Everything that leaves the node over HTTP (the ``http``, ``otlp`` and ``controller`` sinks and
the agent's controller client) uses this package, so a rule about the wire is written once:

* :mod:`~tapio.transport.endpoint` -- URL validation, verifying TLS contexts;
* :mod:`~tapio.transport.credentials` -- :class:`Secret`, header checks, re-readable bearer tokens;
* :mod:`~tapio.transport.policy` -- outcome of an attempt, retry/backoff policy, ``Retry-After``;
* :mod:`~tapio.transport.session` -- the one aiohttp session factory, bounded reads;
* :mod:`~tapio.transport.link` -- the agent's shared link to one controller.
"""

from tapio.transport.credentials import BearerToken, Secret, check_header, redacted_headers
from tapio.transport.endpoint import make_ssl_context, parse_endpoint, safe_url, tls_for
from tapio.transport.link import ControllerLink, make_link
from tapio.transport.policy import (
    Attempt,
    RetryPolicy,
    backoff_delay,
    classify_exception,
    classify_status,
    describe_exc,
    parse_retry_after,
    retry_delay,
)
from tapio.transport.session import MAX_RESPONSE_BYTES, client_session, read_bounded

__all__ = [
    "MAX_RESPONSE_BYTES",
    "Attempt",
    "BearerToken",
    "ControllerLink",
    "RetryPolicy",
    "Secret",
    "backoff_delay",
    "check_header",
    "classify_exception",
    "classify_status",
    "client_session",
    "describe_exc",
    "make_link",
    "make_ssl_context",
    "parse_endpoint",
    "parse_retry_after",
    "read_bounded",
    "redacted_headers",
    "retry_delay",
    "safe_url",
    "tls_for",
]
