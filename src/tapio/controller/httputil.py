"""HTTP plumbing shared by the controller's routes: the JSON error envelope, JSON answers, the
bounded body reader and ``If-None-Match`` matching.

Kept apart from the routes so the auth middleware and the forwarding backpressure answer with
exactly the same envelope as validation errors do.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from tapio import wire

JSON_CONTENT_TYPE: Final = "application/json"

CODES_BY_STATUS: Final = {
    400: "MALFORMED_JSON",
    404: "UNKNOWN_ENDPOINT",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def error_response(err: wire.WireError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=err.status,
        body=wire.encode(err.envelope()),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def json_response(
    msg: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=wire.encode(msg), content_type=JSON_CONTENT_TYPE, headers=headers
    )


def is_json_content_type(header: str | None) -> bool:
    if header is None:
        return False
    mime = header.split(";", 1)[0].strip().lower()
    return mime == JSON_CONTENT_TYPE or (mime.startswith("application/") and mime.endswith("+json"))


async def read_json_body(request: web.Request, limit: int = wire.MAX_BODY_BYTES) -> bytes:
    if not is_json_content_type(request.headers.get("Content-Type")):
        raise wire.WireError.malformed_json(
            "Expected request with `Content-Type: application/json`"
        )
    declared = request.content_length
    if declared is not None and declared > limit:
        raise wire.WireError.payload_too_large(limit)
    body = bytearray()
    while True:
        chunk = await request.content.read(65_536)
        if not chunk:
            break
        body += chunk
        if len(body) > limit:
            raise wire.WireError.payload_too_large(limit)
    return bytes(body)


def if_none_match(header: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison over a list, plus ``*``; an agent's exact quoted hash is the
    common case."""
    if header is None:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False
