"""Credentials on the wire: secrets that never print themselves, header checks, bearer tokens.

A credential only ever lives inside a :class:`Secret`, whose ``repr``/``str`` is ``***``, so it
cannot leak through a log event, a settings ``repr`` or an error message by accident. Comparing a
presented credential with a configured one goes through :meth:`Secret.matches`, which takes the
same time wherever the first difference is.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

_FORBIDDEN_HEADER_CHARS = ("\r", "\n", "\0")
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
#: A token file larger than this is not a token (and must not be read into memory whole).
MAX_TOKEN_BYTES = 64 * 1024


class Secret:
    """A credential that never shows itself in ``repr``/``str`` (and therefore in logs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value, for the one place that must send it (a request header)."""
        return self._value

    def matches(self, presented: str | bytes) -> bool:
        """Constant-time comparison with a presented credential."""
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(self._value.encode("utf-8", "surrogateescape"), presented)

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


def redacted_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The header names with every value replaced by ``***`` (for ``repr`` and logs)."""
    return dict.fromkeys(headers, "***")


class BearerToken:
    """A bearer token from a file or from an environment variable.

    A file is re-read whenever its modification time or size changes, so a rotated token (a
    Kubernetes projected service-account token, a renewed secret) is picked up without a
    restart; an environment variable is read once. The value only ever lives inside a
    :class:`Secret`.
    """

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
                raw = fh.read(MAX_TOKEN_BYTES)
            self._value = self._check(raw)
            self._stamp = stamp
        return self._value

    def header(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}``, or ``{}`` when no token is configured."""
        token = self.get()
        return {"Authorization": "Bearer " + token.reveal()} if token else {}

    def __repr__(self) -> str:
        source = f"file={self._file!r}" if self._file else "env"
        return f"BearerToken({source}, value=***)"
