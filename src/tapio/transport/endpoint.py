"""Where a request goes and how it is protected: URL validation and verifying TLS contexts."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # yarl loads when an endpoint is parsed, not when a module imports this one
    from yarl import URL


def parse_endpoint(endpoint: str, *, what: str) -> URL:
    """Validate an ``http://`` or ``https://`` URL with a host (hostnames resolve normally).

    Credentials inside the URL are refused: they would end up in logs and ``repr``; tokens have
    their own, redacted, settings.
    """
    from yarl import URL

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


def safe_url(url: URL) -> str:
    """The URL without query and fragment, for logs (a query may carry a key)."""
    return str(url.with_query(None).with_fragment(None))


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: the system trust store, or only ``ca_file`` when given.

    Hostname checking and certificate verification stay on; there is no option to turn them off.
    An unreadable or malformed ``ca_file`` raises (``OSError``/``ssl.SSLError``) so it is a
    start-up error, not a silent downgrade.
    """
    if ca_file is not None:
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context()


def tls_for(url: URL, ca_file: str | None) -> ssl.SSLContext | None:
    """The verifying context an ``https://`` URL needs; None for ``http://``."""
    return make_ssl_context(ca_file) if url.scheme == "https" else None
