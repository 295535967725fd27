"""Agent authentication: one shared bearer token, read from a file that may be rotated live.

Every ``/v1/*`` route requires ``Authorization: Bearer <token>`` when a token file is
configured; ``/healthz``, ``/readyz`` and ``/metrics`` stay open for probes and scrapers. The
check runs before the body is read, so a refused request costs no parsing and changes no state.

Rotation: a Kubernetes Secret volume swaps a symlink, which changes the inode the path resolves
to; a plain edit changes mtime or size. The file is re-``stat``-ed at most once per
``check_interval`` seconds (a bounded cost on the hot path) and re-read only when its identity
changed. A rotation that leaves the file unreadable or empty keeps the previous token (logged
once per failure reason), because refusing every agent for a half-written Secret would be an
outage of our own making.

The token itself never reaches a log line, a metric label or an error message: logs name the
file, errors say "missing" or "invalid".
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tapio import wire

#: A token file larger than this is not a token (and is not read into memory).
MAX_TOKEN_BYTES: Final = 4096
DEFAULT_CHECK_INTERVAL: Final = 1.0
TOKEN_FILE_ENV: Final = "TAPIO_AGENT_TOKEN_FILE"


class TokenFileError(Exception):
    """The token file cannot serve as a token (reason names the file, never its content)."""


def unauthorized(reason: str) -> wire.WireError:
    return wire.WireError(401, "UNAUTHORIZED", reason)


@dataclass(frozen=True, slots=True)
class _Identity:
    dev: int
    ino: int
    size: int
    mtime_ns: int


def _identity(path: Path) -> _Identity:
    st = os.stat(path)  # follows the Secret volume's symlinks: a swap changes the inode
    return _Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_token(path: Path) -> bytes:
    """The token in ``path``: its bytes without surrounding whitespace (a trailing newline from
    ``echo`` or ``kubectl create secret --from-file`` is not part of it)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenFileError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    token = raw.strip()
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    if any(b < 0x21 or b > 0x7E for b in token):
        raise TokenFileError(f"token file {path} holds characters not allowed in a bearer token")
    return token


class TokenFile:
    """The current agent token, re-read when the file changes (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
        name: str = "agent token",
    ) -> None:
        self.path = Path(path)
        self.name = name  # what log lines call it (the scheduler token file reuses this class)
        self.check_interval = check_interval
        self._clock = clock
        self._log = logger
        self._token = read_token(self.path)  # TokenFileError aborts start-up
        self._identity: _Identity | None = _identity(self.path)
        self._checked_at = clock()
        self._last_failure = ""
        self.rotations = 0

    def current(self) -> bytes:
        now = self._clock()
        if now - self._checked_at >= self.check_interval:
            self._checked_at = now
            self._refresh()
        return self._token

    def _refresh(self) -> None:
        try:
            identity = _identity(self.path)
            if identity == self._identity:
                return
            token = read_token(self.path)
        except (OSError, TokenFileError) as exc:
            reason = str(exc) if isinstance(exc, TokenFileError) else f"cannot stat {self.path}"
            if reason != self._last_failure and self._log is not None:
                self._log.error(
                    f"{self.name} file unusable; keeping the previous token", reason=reason
                )
            self._last_failure = reason
            return
        self._identity = identity
        self._last_failure = ""
        if not hmac.compare_digest(token, self._token):
            self._token = token
            self.rotations += 1
            if self._log is not None:
                self._log.info(f"{self.name} rotated", token_file=str(self.path))

    def verify(self, header: str | None) -> str | None:
        """None when ``header`` carries the current token, else the refusal reason
        (``missing`` or ``invalid``, which is also the metric label)."""
        if header is None:
            return "missing"
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "invalid"
        candidate = presented.strip().encode("utf-8", "replace")
        return None if hmac.compare_digest(candidate, self.current()) else "invalid"


def is_protected(path: str) -> bool:
    """Every wire route (and anything else under ``/v1``, so probing for routes needs a token),
    and the MCP endpoint."""
    return path == "/v1" or path.startswith("/v1/") or path == "/mcp" or path.startswith("/mcp/")
