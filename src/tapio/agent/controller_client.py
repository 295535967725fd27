"""The agent's tapio-wire/v1 requests: hello, config poll (ETag), heartbeat.

Each call is one bounded HTTP exchange on a shared aiohttp ``ClientSession`` (connect and total
timeouts, response bodies capped) that either returns the decoded, validated answer or raises
:class:`ControllerCallError` with a short reason. No retry logic lives here; the loops in
:mod:`tapio.agent.controller_mode` own backoff and jitter.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec

from tapio import wire
from tapio.transport import ControllerLink, describe_exc

if TYPE_CHECKING:  # aiohttp loads with the first session, not with controller mode
    import aiohttp

#: Response caps: the config carries the compiled profile (small, but allow growth); the rest
#: are a few hundred bytes.
MAX_CONFIG_RESPONSE_BYTES: Final = 1024 * 1024
MAX_SMALL_RESPONSE_BYTES: Final = 64 * 1024

T = TypeVar("T")
_A = TypeVar("_A", wire.HelloResponse, wire.HeartbeatResponse)


class ControllerCallError(Exception):
    """A request that did not produce a usable answer (already described for the log)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        #: ``transport`` (connect/timeout/reset), ``status`` (unexpected HTTP status),
        #: ``invalid`` (undecodable or invalid body) or ``too_large``.
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Identity:
    agent_id: str
    node_name: str


def identity_from_env() -> Identity:
    """``TAPIO_NODE_NAME`` (else the hostname), ``TAPIO_AGENT_ID`` (else ``node/<node_name>``)."""
    node = (os.environ.get("TAPIO_NODE_NAME") or "").strip()
    if not node:
        node = socket.gethostname().strip() or "unknown-node"
    agent_id = (os.environ.get("TAPIO_AGENT_ID") or "").strip() or f"node/{node}"
    return Identity(agent_id=agent_id, node_name=node)


def kernel_release() -> str:
    try:
        with open("/proc/sys/kernel/osrelease", encoding="utf-8") as fh:
            return fh.read(256).strip() or "unknown"
    except OSError:
        return platform.release() or "unknown"


def arch() -> str:
    return platform.machine() or "unknown"


class _ConfigEnvelope(msgspec.Struct):
    """The ``config`` member of a ConfigResponse as raw bytes (for hash verification)."""

    config: msgspec.Raw


@dataclass(frozen=True)
class FetchedConfig:
    response: wire.ConfigResponse
    #: The exact bytes of the ``config`` member as served.
    raw_config: bytes
    etag: str | None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise ControllerCallError("too_large", f"response body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ControllerCallError("too_large", f"response body exceeds {limit} bytes")


def _decode(raw: bytes, type_: type[T]) -> T:
    try:
        return wire.decode(raw, type_)
    except wire.WireError as exc:
        raise ControllerCallError("invalid", exc.message) from None


def _error_detail(status: int, raw: bytes) -> str:
    try:
        env = wire.decode(raw, wire.ErrorEnvelope)
    except wire.WireError:
        return f"HTTP {status}"
    return f"HTTP {status} {env.error.code}: {env.error.message}"


class ControllerClient:
    def __init__(self, link: ControllerLink, session: aiohttp.ClientSession) -> None:
        self.link = link
        self.session = session

    async def _post(self, path: str, msg: object) -> tuple[int, bytes]:
        try:
            async with self.session.post(
                self.link.url(path),
                data=wire.encode(msg),
                headers={"Content-Type": "application/json", **self.link.auth_headers()},
                allow_redirects=False,
            ) as resp:
                return resp.status, await _read_capped(resp, MAX_SMALL_RESPONSE_BYTES)
        except ControllerCallError:
            raise
        except Exception as exc:  # aiohttp errors, timeouts, OSError
            raise ControllerCallError("transport", describe_exc(exc)) from None

    async def _exchange(self, path: str, msg: object, answer_type: type[_A]) -> _A:
        """POST ``msg``; a 2xx answer decoded as ``answer_type`` and validated."""
        status, raw = await self._post(path, msg)
        if not 200 <= status < 300:
            raise ControllerCallError("status", _error_detail(status, raw))
        answer = _decode(raw, answer_type)
        try:
            answer.validate()
        except wire.WireError as exc:
            raise ControllerCallError("invalid", exc.message) from None
        return answer

    async def hello(self, req: wire.HelloRequest) -> wire.HelloResponse:
        return await self._exchange("/v1/agents/hello", req, wire.HelloResponse)

    async def heartbeat(self, req: wire.HeartbeatRequest) -> wire.HeartbeatResponse:
        return await self._exchange("/v1/agents/heartbeat", req, wire.HeartbeatResponse)

    async def fetch_config(self, etag: str | None) -> FetchedConfig | None:
        """The served config, or None on 304 Not Modified. Decoded, not validated."""
        headers = {"Accept": "application/json"}
        if etag:
            headers["If-None-Match"] = etag
        url = self.link.url("/v1/agents/config").with_query(
            {"agent_id": self.link.agent_id, "node_name": self.link.node_name}
        )
        try:
            headers.update(self.link.auth_headers())
            async with self.session.get(url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                got_etag = resp.headers.get("ETag")
                raw = await _read_capped(resp, MAX_CONFIG_RESPONSE_BYTES)
        except ControllerCallError:
            raise
        except Exception as exc:
            raise ControllerCallError("transport", describe_exc(exc)) from None
        if status == 304:
            return None
        if status != 200:
            raise ControllerCallError("status", _error_detail(status, raw))
        response = _decode(raw, wire.ConfigResponse)
        raw_config = bytes(_decode(raw, _ConfigEnvelope).config)
        return FetchedConfig(response=response, raw_config=raw_config, etag=got_etag)
